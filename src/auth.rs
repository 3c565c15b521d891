//! JWT verification: who a connection is (tenant, user) and until when.
//!
//! Invariants: only configured algorithms are accepted and each has its own key, so a token
//! cannot pick a key meant for another algorithm (no algorithm confusion); `alg: none` never
//! parses. `exp` and `nbf` are checked here in milliseconds with `auth.leeway_ms`. Immutable
//! after start-up and shared read-only by every core.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::Value;

use crate::config;
use crate::protocol::{is_entity_id, is_tenant_id};

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant: Box<str>,
    pub user: Box<str>,
    /// `exp` in milliseconds since the Unix epoch, leeway included.
    pub expires_at_ms: u64,
    /// The `cid` claim of a subscription token.
    pub conversation: Option<Box<str>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("algorithm not accepted")]
    Algorithm,
    #[error("bad signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("wrong audience")]
    Audience,
    #[error("wrong issuer")]
    Issuer,
    #[error("invalid claim: {0}")]
    Claim(&'static str),
    #[error("the token's {0} is not this subscription's")]
    Mismatch(&'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a {kind} public key in PEM: {message}")]
    Pem {
        path: String,
        kind: &'static str,
        message: String,
    },
}

/// Loads a key of type `K` from PEM.
type PemKey<K> = fn(&[u8]) -> jsonwebtoken::errors::Result<K>;

pub struct Verifier {
    keys: HashMap<Algorithm, DecodingKey>,
    tenant_claim: String,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_ms: u64,
}

impl Verifier {
    pub fn new(auth: &config::Auth) -> Result<Verifier, KeyError> {
        let mut keys = HashMap::new();
        if !auth.hs256_secret.is_empty() {
            keys.insert(
                Algorithm::HS256,
                DecodingKey::from_secret(auth.hs256_secret.as_bytes()),
            );
        }
        let pem_keys: [(&str, Algorithm, &str, PemKey<DecodingKey>); 2] = [
            (
                &auth.rs256_public_key_file,
                Algorithm::RS256,
                "RSA",
                DecodingKey::from_rsa_pem,
            ),
            (
                &auth.es256_public_key_file,
                Algorithm::ES256,
                "EC P-256",
                DecodingKey::from_ec_pem,
            ),
        ];
        for (path, alg, kind, load) in pem_keys {
            if path.is_empty() {
                continue;
            }
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.into(),
                source,
            })?;
            let key = load(&pem).map_err(|e| KeyError::Pem {
                path: path.into(),
                kind,
                message: e.to_string(),
            })?;
            keys.insert(alg, key);
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Ok(Verifier {
            keys,
            tenant_claim: auth.tenant_claim.clone(),
            audience: non_empty(&auth.audience),
            issuer: non_empty(&auth.issuer),
            leeway_ms: auth.leeway_ms,
        })
    }

    /// Verifies `token` at `now_ms` (milliseconds since the Unix epoch).
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                AuthError::Algorithm
            }
            // A header that names an algorithm jsonwebtoken does not know (`none`, `NONE`).
            _ if names_an_unknown_algorithm(token) => AuthError::Algorithm,
            _ => AuthError::Malformed,
        })?;
        let key = self.keys.get(&header.alg).ok_or(AuthError::Algorithm)?;
        let mut validation = Validation::new(header.alg);
        // Time claims are checked below, in milliseconds; presence of `exp` and `sub` here.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let claims = jsonwebtoken::decode::<HashMap<String, Value>>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::Signature,
                ErrorKind::InvalidAlgorithm => AuthError::Algorithm,
                ErrorKind::InvalidAudience => AuthError::Audience,
                ErrorKind::InvalidIssuer => AuthError::Issuer,
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::Claim("exp"),
                ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::Claim("sub"),
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
                ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
                _ => AuthError::Malformed,
            })?
            .claims;
        let seconds = |name: &'static str| match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|s| s.is_finite())
                .map(|s| Some((s * 1000.0) as u64))
                .ok_or(AuthError::Claim(name)),
        };
        let expires_at_ms = seconds("exp")?
            .ok_or(AuthError::Claim("exp"))?
            .saturating_add(self.leeway_ms);
        if expires_at_ms <= now_ms {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = seconds("nbf")? {
            if nbf > now_ms.saturating_add(self.leeway_ms) {
                return Err(AuthError::NotYetValid);
            }
        }
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| is_entity_id(s))
            .ok_or(AuthError::Claim("sub"))?;
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(Value::as_str)
            .filter(|s| is_tenant_id(s))
            .ok_or(AuthError::Claim("tenant"))?;
        let conversation = match claims.get("cid") {
            None => None,
            Some(cid) => Some(
                cid.as_str()
                    .filter(|c| is_entity_id(c))
                    .ok_or(AuthError::Claim("cid"))?
                    .into(),
            ),
        };
        Ok(Identity {
            tenant: tenant.into(),
            user: user.into(),
            expires_at_ms,
            conversation,
        })
    }

    /// Verifies a subscription token (`auth.subscribe_policy = "token"`): valid as any token,
    /// and its `sub`, tenant and `cid` are this subscription's.
    pub fn verify_subscription(
        &self,
        token: &str,
        tenant: &str,
        user: &str,
        conversation: &str,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let identity = self.verify(token, now_ms)?;
        if *identity.user != *user {
            return Err(AuthError::Mismatch("sub"));
        }
        if *identity.tenant != *tenant {
            return Err(AuthError::Mismatch("tenant"));
        }
        match identity.conversation.as_deref() {
            None => Err(AuthError::Claim("cid")),
            Some(cid) if cid != conversation => Err(AuthError::Mismatch("cid")),
            Some(_) => Ok(()),
        }
    }
}

/// Whether `token`'s header is JSON whose `alg` is a string that names no known algorithm.
fn names_an_unknown_algorithm(token: &str) -> bool {
    use base64::Engine;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|json| serde_json::from_slice::<Value>(&json).ok())
        .is_some_and(|h| {
            h["alg"]
                .as_str()
                .is_some_and(|a| a.parse::<Algorithm>().is_err())
        })
}

/// Signs an HS256 connection token, as `fanfare token` prints it.
pub fn mint_hs256(
    auth: &config::Auth,
    tenant: &str,
    user: &str,
    ttl_s: u64,
    now_s: u64,
) -> Result<String, MintError> {
    mint(auth, tenant, user, None, ttl_s, now_s)
}

/// Signs an HS256 subscription token for `conversation`, as `fanfare token --conversation`
/// prints it.
pub fn mint_hs256_subscription(
    auth: &config::Auth,
    tenant: &str,
    user: &str,
    conversation: &str,
    ttl_s: u64,
    now_s: u64,
) -> Result<String, MintError> {
    mint(auth, tenant, user, Some(conversation), ttl_s, now_s)
}

fn mint(
    auth: &config::Auth,
    tenant: &str,
    user: &str,
    conversation: Option<&str>,
    ttl_s: u64,
    now_s: u64,
) -> Result<String, MintError> {
    if auth.hs256_secret.is_empty() {
        return Err(MintError::NoSecret);
    }
    if !is_tenant_id(tenant) {
        return Err(MintError::Tenant(tenant.into()));
    }
    if !is_entity_id(user) {
        return Err(MintError::User(user.into()));
    }
    if let Some(c) = conversation.filter(|c| !is_entity_id(c)) {
        return Err(MintError::Conversation(c.into()));
    }
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), user.into());
    if let Some(conversation) = conversation {
        claims.insert("cid".into(), conversation.into());
    }
    claims.insert(auth.tenant_claim.clone(), tenant.into());
    claims.insert("iat".into(), now_s.into());
    claims.insert("exp".into(), (now_s + ttl_s).into());
    if !auth.audience.is_empty() {
        claims.insert("aud".into(), auth.audience.clone().into());
    }
    if !auth.issuer.is_empty() {
        claims.insert("iss".into(), auth.issuer.clone().into());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(auth.hs256_secret.as_bytes()),
    )
    .map_err(MintError::Sign)
}

/// Why `fanfare token` could not mint a token.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("auth.hs256_secret is empty: HS256 tokens cannot be minted")]
    NoSecret,
    #[error("tenant `{0}` does not match [A-Za-z0-9._-]{{1,64}}")]
    Tenant(String),
    #[error("user `{0}` does not match [A-Za-z0-9._~@:-]{{1,128}}")]
    User(String),
    #[error("conversation `{0}` does not match [A-Za-z0-9._~@:-]{{1,128}}")]
    Conversation(String),
    #[error("signing failed: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW_S: u64 = 1_800_000_000;
    const NOW: u64 = NOW_S * 1000;

    fn cfg() -> config::Auth {
        config::Auth {
            hs256_secret: "unit-secret".into(),
            rs256_public_key_file: "tests/keys/rs256.pub.pem".into(),
            es256_public_key_file: "tests/keys/es256.pub.pem".into(),
            ..Default::default()
        }
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": "u1", "tid": "t1", "exp": NOW_S + 60});
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    fn hs(c: &Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            c,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn pem_signed(alg: Algorithm, c: &Value) -> String {
        let (path, key): (&str, PemKey<EncodingKey>) = match alg {
            Algorithm::RS256 => ("tests/keys/rs256.pem", EncodingKey::from_rsa_pem),
            _ => ("tests/keys/es256.pem", EncodingKey::from_ec_pem),
        };
        jsonwebtoken::encode(
            &Header::new(alg),
            c,
            &key(&std::fs::read(path).unwrap()).unwrap(),
        )
        .unwrap()
    }

    fn verify_with(a: &config::Auth, token: &str) -> Result<Identity, AuthError> {
        Verifier::new(a).unwrap().verify(token, NOW)
    }

    #[test]
    fn accepts_each_configured_algorithm() {
        let c = claims(json!({}));
        for token in [
            hs(&c, "unit-secret"),
            pem_signed(Algorithm::RS256, &c),
            pem_signed(Algorithm::ES256, &c),
        ] {
            let id = verify_with(&cfg(), &token).unwrap();
            assert_eq!(
                (&*id.tenant, &*id.user, id.expires_at_ms),
                ("t1", "u1", NOW + 60_000)
            );
        }
    }

    #[test]
    fn rejects_unconfigured_algorithms_and_confusion() {
        let c = claims(json!({}));
        let hs_only = config::Auth {
            hs256_secret: "unit-secret".into(),
            ..Default::default()
        };
        assert_eq!(
            verify_with(&hs_only, &pem_signed(Algorithm::RS256, &c)),
            Err(AuthError::Algorithm)
        );
        // HS256 signed with the RSA public key as the secret: the classic confusion attack.
        let public = std::fs::read_to_string("tests/keys/rs256.pub.pem").unwrap();
        let rs_only = config::Auth {
            hs256_secret: String::new(),
            ..cfg()
        };
        assert_eq!(
            verify_with(&rs_only, &hs(&c, &public)),
            Err(AuthError::Algorithm)
        );
        // alg: none — jsonwebtoken's header type cannot even represent it: never parsed, and
        // refused as an algorithm not accepted.
        use base64_url as b64;
        let none = format!(
            "{}.{}.",
            b64::encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64::encode(&c.to_string())
        );
        assert_eq!(verify_with(&cfg(), &none), Err(AuthError::Algorithm));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &c,
            &EncodingKey::from_secret(b"unit-secret"),
        )
        .unwrap();
        assert_eq!(verify_with(&cfg(), &hs512), Err(AuthError::Algorithm));
    }

    /// Minimal base64url (no padding) for hand-built tokens.
    mod base64_url {
        pub fn encode(s: &str) -> String {
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let b = s.as_bytes();
            let mut out = String::new();
            for chunk in b.chunks(3) {
                let n = chunk
                    .iter()
                    .enumerate()
                    .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
                for i in 0..=chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }

    #[test]
    fn checks_signature_and_time_claims() {
        let v = |extra: Value| verify_with(&cfg(), &hs(&claims(extra), "unit-secret"));
        assert_eq!(
            verify_with(&cfg(), &hs(&claims(json!({})), "other")),
            Err(AuthError::Signature)
        );
        assert_eq!(v(json!({"exp": NOW_S - 1})), Err(AuthError::Expired));
        assert_eq!(v(json!({"exp": NOW_S})), Err(AuthError::Expired));
        assert_eq!(v(json!({"nbf": NOW_S + 5})), Err(AuthError::NotYetValid));
        assert!(v(json!({"nbf": NOW_S})).is_ok());
        assert_eq!(v(json!({"exp": null})), Err(AuthError::Claim("exp")));
        assert_eq!(v(json!({"exp": "soon"})), Err(AuthError::Claim("exp")));
        let lenient = config::Auth {
            leeway_ms: 2000,
            ..cfg()
        };
        let t = hs(
            &claims(json!({"exp": NOW_S - 1, "nbf": NOW_S + 1})),
            "unit-secret",
        );
        assert!(verify_with(&lenient, &t).is_ok());
        assert_eq!(
            verify_with(&cfg(), "not.a.token"),
            Err(AuthError::Malformed)
        );
        assert_eq!(verify_with(&cfg(), ""), Err(AuthError::Missing));
    }

    #[test]
    fn checks_identity_claims() {
        let v = |extra: Value| verify_with(&cfg(), &hs(&claims(extra), "unit-secret"));
        assert_eq!(v(json!({"sub": null})), Err(AuthError::Claim("sub")));
        assert_eq!(v(json!({"sub": "a b"})), Err(AuthError::Claim("sub")));
        assert_eq!(v(json!({"tid": null})), Err(AuthError::Claim("tenant")));
        assert_eq!(v(json!({"tid": "t:1"})), Err(AuthError::Claim("tenant")));
        let custom = config::Auth {
            tenant_claim: "org".into(),
            ..cfg()
        };
        let t = hs(&claims(json!({"tid": null, "org": "acme"})), "unit-secret");
        assert_eq!(&*verify_with(&custom, &t).unwrap().tenant, "acme");
    }

    #[test]
    fn checks_audience_and_issuer_when_configured() {
        let strict = config::Auth {
            audience: "app".into(),
            issuer: "idp".into(),
            ..cfg()
        };
        let t = |extra: Value| verify_with(&strict, &hs(&claims(extra), "unit-secret"));
        assert!(t(json!({"aud": "app", "iss": "idp"})).is_ok());
        assert_eq!(
            t(json!({"aud": "other", "iss": "idp"})),
            Err(AuthError::Audience)
        );
        assert_eq!(t(json!({"iss": "idp"})), Err(AuthError::Audience));
        assert_eq!(
            t(json!({"aud": "app", "iss": "evil"})),
            Err(AuthError::Issuer)
        );
        assert_eq!(t(json!({"aud": "app"})), Err(AuthError::Issuer));
    }

    #[test]
    fn minted_tokens_verify() {
        let a = cfg();
        let token = mint_hs256(&a, "t9", "u9", 60, NOW_S).unwrap();
        let id = verify_with(&a, &token).unwrap();
        assert_eq!((&*id.tenant, &*id.user), ("t9", "u9"));
        assert!(mint_hs256(&a, "bad tenant", "u", 60, NOW_S).is_err());
    }
}
