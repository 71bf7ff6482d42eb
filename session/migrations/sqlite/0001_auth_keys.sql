-- The same tables as migrations/mysql, for the embedded default.
CREATE TABLE IF NOT EXISTS auth_keys (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  auth_key_id BIGINT NOT NULL UNIQUE,
  body VARCHAR(512) NOT NULL,
  deleted TINYINT NOT NULL DEFAULT 0,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS auth_key_infos (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  auth_key_id BIGINT NOT NULL UNIQUE,
  auth_key_type INT NOT NULL DEFAULT 0,
  perm_auth_key_id BIGINT NOT NULL DEFAULT 0,
  temp_auth_key_id BIGINT NOT NULL DEFAULT 0,
  media_temp_auth_key_id BIGINT NOT NULL DEFAULT 0,
  deleted TINYINT NOT NULL DEFAULT 0,
  created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE IF NOT EXISTS mtproto_edge_auth_key_expiry (
  auth_key_id BIGINT NOT NULL PRIMARY KEY,
  expires_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS mtproto_edge_salts (
  auth_key_id BIGINT NOT NULL,
  salt BIGINT NOT NULL,
  valid_since INT NOT NULL,
  valid_until INT NOT NULL,
  PRIMARY KEY (auth_key_id, valid_since, salt)
);
