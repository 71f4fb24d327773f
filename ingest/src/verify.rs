//! Signature checks, one per scheme. Every comparison of a secret-derived value is
//! constant-time; `now` is a parameter so published test vectors can be checked.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a delivery was not verified; the label of the verification-failure metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint has no secret for this delivery: it refuses rather than skip checks.
    NoSecret,
    /// No signature header.
    Missing,
    /// A signature header that is not in the scheme's format.
    Malformed,
    /// A well-formed signature that no configured secret produces.
    Mismatch,
    /// A Standard Webhooks timestamp outside the tolerance (a replay or a bad clock).
    Expired,
    /// Only the SHA-1 header was sent and SHA-1 is not enabled.
    Sha1Disabled,
}

impl Failure {
    /// Low-cardinality metric label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::NoSecret => "no_secret",
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Mismatch => "mismatch",
            Failure::Expired => "expired",
            Failure::Sha1Disabled => "sha1_disabled",
        }
    }

    /// What the client is told: precise enough to fix a misconfiguration, and nothing
    /// about the secrets.
    pub fn message(self) -> &'static str {
        match self {
            Failure::NoSecret => "no webhook secret is configured for this endpoint or repository",
            Failure::Missing => "missing signature header",
            Failure::Malformed => "malformed signature header",
            Failure::Mismatch => "signature does not match",
            Failure::Expired => "webhook timestamp outside the accepted tolerance",
            Failure::Sha1Disabled => "SHA-1 signatures are not accepted: send X-Hub-Signature-256",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;
type HmacSha1 = Hmac<sha1::Sha1>;

/// GitHub's `X-Hub-Signature-256: sha256=<hex>` over the raw body.
pub fn github_sha256(secrets: &[SecretString], header: &str, body: &[u8]) -> Result<(), Failure> {
    let expected = parse_hex_sig(header, "sha256=", 32)?;
    check_each(secrets, |secret| {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// GitHub's legacy `X-Hub-Signature: sha1=<hex>`, only when explicitly enabled.
pub fn github_sha1(secrets: &[SecretString], header: &str, body: &[u8]) -> Result<(), Failure> {
    let expected = parse_hex_sig(header, "sha1=", 20)?;
    check_each(secrets, |secret| {
        let mut mac = HmacSha1::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        mac.update(body);
        mac.verify_slice(&expected).is_ok()
    })
}

/// GitLab's `X-Gitlab-Token`, a shared token sent as is. Signing tokens (`whsec_…`) in
/// the same list are skipped: they are only valid as Standard Webhooks keys.
pub fn gitlab_token(secrets: &[SecretString], token: &str) -> Result<(), Failure> {
    // Comparing digests keeps the comparison constant-time even in the length.
    let given = Sha256::digest(token.as_bytes());
    check_each(secrets, |secret| {
        !secret.starts_with("whsec_") && bool::from(Sha256::digest(secret.as_bytes()).ct_eq(&given))
    })
}

/// The three Standard Webhooks headers.
#[derive(Debug, Clone, Copy)]
pub struct StandardHeaders<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
}

/// Standard Webhooks: `v1,<base64 HMAC-SHA256>` over `id.timestamp.body` with the
/// base64 key after `whsec_`; several space-separated signatures may be sent, and the
/// timestamp must be within `tolerance_secs` of `now_unix` either way.
pub fn standard(
    secrets: &[SecretString],
    headers: StandardHeaders<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: u64,
) -> Result<(), Failure> {
    let ts: i64 = headers
        .timestamp
        .trim()
        .parse()
        .map_err(|_| Failure::Malformed)?;
    // The timestamp is the sender's: `abs_diff` cannot overflow where `now - ts`
    // would for a hostile i64::MIN or i64::MAX.
    if now_unix.abs_diff(ts) > tolerance_secs {
        return Err(Failure::Expired);
    }
    let signatures: Vec<Vec<u8>> = headers
        .signature
        .split_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| B64.decode(s).ok())
        .collect();
    if signatures.is_empty() {
        return Err(Failure::Malformed);
    }
    check_each(secrets, |secret| {
        let Some(key) = standard_key(secret) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key");
        mac.update(headers.id.as_bytes());
        mac.update(b".");
        mac.update(headers.timestamp.trim().as_bytes());
        mac.update(b".");
        mac.update(body);
        let computed = mac.finalize().into_bytes();
        signatures
            .iter()
            .any(|sig| bool::from(sig.as_slice().ct_eq(computed.as_slice())))
    })
}

/// The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`.
fn standard_key(secret: &str) -> Option<Vec<u8>> {
    B64.decode(secret.strip_prefix("whsec_")?).ok()
}

fn parse_hex_sig(header: &str, prefix: &str, len: usize) -> Result<Vec<u8>, Failure> {
    let hex_sig = header
        .trim()
        .strip_prefix(prefix)
        .ok_or(Failure::Malformed)?;
    let bytes = hex::decode(hex_sig).map_err(|_| Failure::Malformed)?;
    if bytes.len() != len {
        return Err(Failure::Malformed);
    }
    Ok(bytes)
}

fn check_each(secrets: &[SecretString], check: impl Fn(&str) -> bool) -> Result<(), Failure> {
    if secrets.is_empty() {
        return Err(Failure::NoSecret);
    }
    if secrets.iter().any(|s| check(s.expose_secret())) {
        Ok(())
    } else {
        Err(Failure::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter()
            .map(|s| SecretString::from((*s).to_owned()))
            .collect()
    }

    #[test]
    fn no_secret_is_never_a_pass() {
        assert_eq!(
            github_sha256(&[], "sha256=00", b""),
            Err(Failure::Malformed)
        );
        let sig = format!("sha256={}", "0".repeat(64));
        assert_eq!(github_sha256(&[], &sig, b"x"), Err(Failure::NoSecret));
        assert_eq!(gitlab_token(&[], "t"), Err(Failure::NoSecret));
    }

    #[test]
    fn gitlab_token_matches_exactly() {
        let s = secrets(&["tok-1", "tok-2", "whsec_AAAA"]);
        assert_eq!(gitlab_token(&s, "tok-2"), Ok(()));
        assert_eq!(gitlab_token(&s, "tok-"), Err(Failure::Mismatch));
        assert_eq!(gitlab_token(&s, "whsec_AAAA"), Err(Failure::Mismatch));
    }

    #[test]
    fn sha1_round_trip() {
        let s = secrets(&["k"]);
        let mut mac = HmacSha1::new_from_slice(b"k").expect("key");
        mac.update(b"body");
        let sig = format!("sha1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(github_sha1(&s, &sig, b"body"), Ok(()));
        assert_eq!(github_sha1(&s, &sig, b"bodY"), Err(Failure::Mismatch));
    }

    #[test]
    fn extreme_timestamps_are_expired_not_an_overflow() {
        let s = secrets(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let now = 1_614_265_330;
        for (timestamp, now) in [
            (i64::MIN.to_string(), now),
            (i64::MAX.to_string(), now),
            (i64::MIN.to_string(), i64::MAX),
            (i64::MAX.to_string(), i64::MIN),
            (i64::MAX.to_string(), -1),
        ] {
            let h = StandardHeaders {
                id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
                timestamp: &timestamp,
                signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            };
            assert_eq!(
                standard(&s, h, b"{}", now, 300),
                Err(Failure::Expired),
                "{timestamp} at {now}"
            );
        }
        let h = StandardHeaders {
            id: "m",
            timestamp: "9223372036854775807",
            signature: "v1,AAAA",
        };
        assert_eq!(
            standard(&s, h, b"{}", i64::MAX, u64::MAX),
            Err(Failure::Mismatch)
        );
    }

    #[test]
    fn standard_rejects_bad_timestamps_and_unknown_versions() {
        let s = secrets(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let h = StandardHeaders {
            id: "msg_p5jXN8AQM9LWM0D4loKWxJek",
            timestamp: "not-a-number",
            signature: "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        };
        assert_eq!(standard(&s, h, b"{}", 0, 300), Err(Failure::Malformed));
        let h = StandardHeaders {
            timestamp: "1614265330",
            signature: "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ..h
        };
        assert_eq!(
            standard(&s, h, br#"{"test": 2432232314}"#, 1614265330, 300),
            Err(Failure::Malformed)
        );
    }
}
