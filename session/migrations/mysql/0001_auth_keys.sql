-- teamgram's auth key tables (teamgramd/deploy/sql), created only when absent so an
-- existing teamgram database is used as it is; plus two tables of ours for what
-- teamgram keeps elsewhere or not at all (salts live in Redis there; temp keys
-- never expire there).
CREATE TABLE IF NOT EXISTS `auth_keys` (
  `id` BIGINT NOT NULL AUTO_INCREMENT,
  `auth_key_id` BIGINT NOT NULL,
  `body` VARCHAR(512) NOT NULL,
  `deleted` TINYINT(1) NOT NULL DEFAULT 0,
  `created_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (`id`),
  UNIQUE KEY `auth_key_id` (`auth_key_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `auth_key_infos` (
  `id` BIGINT NOT NULL AUTO_INCREMENT,
  `auth_key_id` BIGINT NOT NULL,
  `auth_key_type` INT NOT NULL DEFAULT 0,
  `perm_auth_key_id` BIGINT NOT NULL DEFAULT 0,
  `temp_auth_key_id` BIGINT NOT NULL DEFAULT 0,
  `media_temp_auth_key_id` BIGINT NOT NULL DEFAULT 0,
  `deleted` TINYINT(1) NOT NULL DEFAULT 0,
  `created_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `updated_at` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (`id`),
  UNIQUE KEY `auth_key_id` (`auth_key_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS `mtproto_edge_auth_key_expiry` (
  `auth_key_id` BIGINT NOT NULL,
  `expires_at` BIGINT NOT NULL,
  PRIMARY KEY (`auth_key_id`)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS `mtproto_edge_salts` (
  `auth_key_id` BIGINT NOT NULL,
  `salt` BIGINT NOT NULL,
  `valid_since` INT NOT NULL,
  `valid_until` INT NOT NULL,
  PRIMARY KEY (`auth_key_id`, `valid_since`, `salt`)
) ENGINE=InnoDB;
