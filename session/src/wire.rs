//! The gRPC messages of teamgram's `session` service as both sides build
//! and read them, and its error contract (status messages; the numeric codes
//! are in [`crate::status`]).

use mtproto_core::authkey::{AuthKey, AuthKeyInfo, AuthKeyType};
use mtproto_edge_proto::mtproto as pb;
use mtproto_edge_proto::session as spb;

use crate::{SessionClientData, SessionClientEvent};

/// teamgram's status message for an unknown key (sent with `grpc-status: 401`).
pub const AUTH_KEY_UNREGISTERED: &str = "AUTH_KEY_UNREGISTERED";
/// teamgram's status message prefix for a key owned by another instance
/// (`grpc-status: 700`).
pub const REDIRECT_PREFIX: &str = "REDIRECT_TO_";

pub fn info_to_proto(info: &AuthKeyInfo) -> pb::AuthKeyInfo {
    pb::AuthKeyInfo {
        predicate_name: "authKeyInfo".into(),
        constructor: pb::AUTH_KEY_INFO,
        auth_key_id: info.id(),
        auth_key: info.key.bytes().to_vec(),
        auth_key_type: info.key_type as i32,
        perm_auth_key_id: info.perm_auth_key_id,
        temp_auth_key_id: info.temp_auth_key_id,
        media_temp_auth_key_id: info.media_temp_auth_key_id,
        expires_at: info.expires_at.unwrap_or(0),
    }
}

/// Converts a session's `AuthKeyInfo`, refusing corrupt ones.
pub fn info_from_proto(info: &pb::AuthKeyInfo) -> Result<AuthKeyInfo, String> {
    let key = AuthKey::from_slice(&info.auth_key).ok_or_else(|| {
        format!(
            "auth key {} has {} bytes, not 256",
            info.auth_key_id,
            info.auth_key.len()
        )
    })?;
    if key.id() != info.auth_key_id {
        return Err(format!(
            "auth key bytes do not hash to id {}",
            info.auth_key_id
        ));
    }
    let key_type = AuthKeyType::from_teamgram(info.auth_key_type)
        .ok_or_else(|| format!("unknown auth_key_type {}", info.auth_key_type))?;
    Ok(AuthKeyInfo {
        key,
        key_type,
        perm_auth_key_id: info.perm_auth_key_id,
        temp_auth_key_id: info.temp_auth_key_id,
        media_temp_auth_key_id: info.media_temp_auth_key_id,
        // teamgram's sessions do not send it: 0, no expiry known.
        expires_at: (info.expires_at != 0).then_some(info.expires_at),
    })
}

/// The generated message, for unary calls (its payload is shared, not
/// copied); stream mode encodes its requests without it.
pub fn data_to_proto(data: SessionClientData) -> spb::SessionClientData {
    spb::SessionClientData {
        predicate_name: "sessionClientData".into(),
        constructor: spb::SESSION_CLIENT_DATA,
        server_id: data.server_id.to_string(),
        conn_type: data.conn_type,
        auth_key_id: data.auth_key_id,
        key_type: data.key_type,
        perm_auth_key_id: data.perm_auth_key_id,
        session_id: data.session_id,
        client_ip: data.client_ip.to_string(),
        quick_ack: data.quick_ack,
        salt: data.salt,
        payload: data.payload,
    }
}

pub fn event_to_proto(event: &SessionClientEvent) -> spb::SessionClientEvent {
    spb::SessionClientEvent {
        predicate_name: "sessionClientEvent".into(),
        constructor: spb::SESSION_CLIENT_EVENT,
        server_id: event.server_id.clone(),
        conn_type: 0,
        auth_key_id: event.auth_key_id,
        key_type: event.key_type,
        perm_auth_key_id: event.perm_auth_key_id,
        session_id: event.session_id,
        client_ip: event.client_ip.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_auth_keys_are_refused() {
        let info = AuthKeyInfo::new(AuthKey::new([5; 256]), AuthKeyType::Perm, None);
        let mut proto = info_to_proto(&info);
        assert_eq!(info_from_proto(&proto).unwrap(), info);
        proto.auth_key.truncate(200);
        assert!(info_from_proto(&proto).is_err());
        let mut proto = info_to_proto(&info);
        proto.auth_key_id ^= 1;
        assert!(info_from_proto(&proto).is_err());
        let mut proto = info_to_proto(&info);
        proto.auth_key_type = 9;
        assert!(info_from_proto(&proto).is_err());
    }

    /// Keys looked up through a remote session lost their expiry here, so
    /// gateways never refused an expired temp key they had not made.
    #[test]
    fn temp_key_expiry_crosses_the_wire() {
        let info = AuthKeyInfo::new(
            AuthKey::new([6; 256]),
            AuthKeyType::Temp,
            Some(1_800_000_000),
        );
        let proto = info_to_proto(&info);
        assert_eq!(proto.expires_at, 1_800_000_000);
        let back = info_from_proto(&proto).unwrap();
        assert_eq!(back, info);
        assert!(back.is_expired(1_800_000_000));
        let perm = AuthKeyInfo::new(AuthKey::new([7; 256]), AuthKeyType::Perm, None);
        assert_eq!(
            info_from_proto(&info_to_proto(&perm)).unwrap().expires_at,
            None
        );
    }
}
