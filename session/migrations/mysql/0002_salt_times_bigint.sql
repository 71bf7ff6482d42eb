-- Salt validity times as 64-bit unix seconds: INT ends on 2038-01-19.
ALTER TABLE `mtproto_edge_salts`
  MODIFY `valid_since` BIGINT NOT NULL,
  MODIFY `valid_until` BIGINT NOT NULL;
