//! Azure IoT Hub's shared access signatures: the MQTT password a device
//! signs with its key, valid until an expiry it chooses, and the user name
//! the hub expects beside it. Pure functions; the forwarder asks for a fresh
//! token on every connection and reconnects before it expires.

use base64::Engine as _;
use ring::hmac;

/// The API version IoT Hub's MQTT user name names.
const API_VERSION: &str = "2021-04-12";

/// Checks that `key` is a device key as the portal shows it (base64).
pub fn check_key(key: &str) -> Result<(), String> {
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(k) if !k.is_empty() => Ok(()),
        _ => Err("is not a base64 device key (the device's primary or secondary key)".into()),
    }
}

/// The MQTT user name IoT Hub expects: `{host}/{device_id}/?api-version=…`.
pub fn username(host: &str, device_id: &str) -> String {
    format!("{host}/{device_id}/?api-version={API_VERSION}")
}

/// A token for `device_id` on `host`, signed with `key`, valid until
/// `expiry` (seconds since the epoch).
pub fn token(host: &str, device_id: &str, key: &str, expiry: u64) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD.decode(key).map_err(|e| format!("device key: {e}"))?;
    let resource = encode(&format!("{host}/devices/{device_id}"));
    let signed = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), format!("{resource}\n{expiry}").as_bytes());
    let signature = encode(&base64::engine::general_purpose::STANDARD.encode(signed.as_ref()));
    Ok(format!("SharedAccessSignature sr={resource}&sig={signature}&se={expiry}"))
}

/// URL-encodes `s` as IoT Hub's signatures and topics want (RFC 3986:
/// everything but unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known answer, computed independently with openssl:
    /// `printf '%s\n%s' 'hub.azure-devices.net%2Fdevices%2Fgw-1' 1800000000 |
    ///  openssl dgst -sha256 -hmac secret-device-key -binary | base64`.
    #[test]
    fn a_token_signs_the_encoded_resource_and_expiry() {
        let key = base64::engine::general_purpose::STANDARD.encode(b"secret-device-key");
        let t = token("hub.azure-devices.net", "gw-1", &key, 1_800_000_000).unwrap();
        assert_eq!(
            t,
            "SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fgw-1\
             &sig=4gtDdWty9DDgONOaNaK33kKSXUqPHGPeF9qiBf09Zz8%3D&se=1800000000"
        );
    }

    #[test]
    fn keys_must_be_base64() {
        assert!(check_key("c2VjcmV0").is_ok());
        assert!(check_key("not base64!").is_err());
        assert_eq!(username("h.azure-devices.net", "d"), "h.azure-devices.net/d/?api-version=2021-04-12");
        assert_eq!(encode("a/b c=d&é"), "a%2Fb%20c%3Dd%26%C3%A9");
    }
}
