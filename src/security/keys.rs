//! API keys: the secret a client presents (`Authorization: Bearer …` or `x-api-key: …`) is
//! hashed and compared with every configured digest in constant time; only digests are ever
//! stored. `backstop keys new` makes a fresh secret.

use std::sync::Arc;

use axum::http::HeaderMap;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::limits::KeyLimits;
use crate::config::security::{KeyConfig, Scope};
use crate::models::{Digest, ModelName};

/// A configured key, ready to check requests against.
#[derive(Debug)]
pub(crate) struct Key {
    pub(crate) name: String,
    /// A short, stable id for logs: the first 8 hex digits of the secret's sha256 (which
    /// reveals nothing usable about the secret).
    pub(crate) id: String,
    digest: [u8; 32],
    pub(crate) scopes: Vec<Scope>,
    pub(crate) models: Vec<ModelName>,
    pub(crate) local_only: bool,
    pub(crate) limits: KeyLimits,
}

impl Key {
    /// Whether the key has a scope.
    pub(crate) fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// Whether the key may use a model (an empty list means every model).
    pub(crate) fn may_use(&self, model: &str) -> bool {
        self.models.is_empty() || ModelName::parse(model).is_ok_and(|m| self.models.contains(&m))
    }
}

/// Why a request's credentials were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// No key was presented.
    Missing,
    /// A key was presented that matches none.
    Wrong,
}

/// All configured keys.
#[derive(Debug, Default)]
pub(crate) struct KeyRing {
    keys: Vec<Arc<Key>>,
}

fn hex_to_bytes(d: &Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, chunk) in d.hex().as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).unwrap_or("00");
        out[i] = u8::from_str_radix(s, 16).unwrap_or(0);
    }
    out
}

impl KeyRing {
    pub(crate) fn new(configs: &[KeyConfig]) -> KeyRing {
        let keys = configs
            .iter()
            .map(|c| {
                Arc::new(Key {
                    name: c.name.clone(),
                    id: c.sha256.hex()[..8].to_owned(),
                    digest: hex_to_bytes(&c.sha256),
                    scopes: c.scopes.clone(),
                    models: c.models.clone(),
                    local_only: c.local_only,
                    limits: KeyLimits::new(c.rpm, c.tpm),
                })
            })
            .collect();
        KeyRing { keys }
    }

    /// Whether authentication is on.
    pub(crate) fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key a request presents. Every key is compared, in constant time, so timing tells
    /// nothing about which (if any) matched.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Key>, AuthError> {
        let secret = presented(headers).ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found: Option<&Arc<Key>> = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found.cloned().ok_or(AuthError::Wrong)
    }
}

/// The secret from `Authorization: Bearer …` or `x-api-key: …`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = match v.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            None if v.eq_ignore_ascii_case("bearer") => "",
            _ => v,
        };
        if !token.is_empty() {
            return Some(token);
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A fresh secret: 32 random bytes, base64url, prefixed so it is recognisable in a leak scan.
pub fn new_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness available: {e}"))?;
    Ok(format!(
        "bsk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The sha256 hex digest of a secret, as `[[security.keys]] sha256` wants it.
pub fn digest_of(secret: &str) -> String {
    Digest::of(secret.as_bytes()).hex().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(secret: &str) -> KeyRing {
        KeyRing::new(&[KeyConfig {
            name: "app".into(),
            sha256: Digest::parse(&digest_of(secret)).unwrap(),
            scopes: vec![Scope::Inference],
            models: vec![ModelName::parse("smollm2").unwrap()],
            local_only: false,
            rpm: None,
            tpm: None,
        }])
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_key_is_accepted_as_bearer_or_x_api_key_and_only_exactly() {
        let r = ring("s3cret");
        assert_eq!(
            r.authenticate(&headers("authorization", "Bearer s3cret"))
                .unwrap()
                .name,
            "app"
        );
        assert_eq!(
            r.authenticate(&headers("x-api-key", "s3cret"))
                .unwrap()
                .name,
            "app"
        );
        assert_eq!(
            r.authenticate(&headers("x-api-key", "S3CRET")).unwrap_err(),
            AuthError::Wrong
        );
        assert_eq!(
            r.authenticate(&headers("authorization", "Bearer s3cret "))
                .unwrap()
                .name,
            "app"
        );
        assert_eq!(
            r.authenticate(&HeaderMap::new()).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            r.authenticate(&headers("authorization", "Bearer "))
                .unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn model_restrictions_follow_ollama_names() {
        let r = ring("k");
        let key = r.authenticate(&headers("x-api-key", "k")).unwrap();
        assert!(key.may_use("smollm2") && key.may_use("SmolLM2:latest"));
        assert!(!key.may_use("gpt-4o") && !key.may_use("../x"));
        assert_eq!(key.id.len(), 8);
    }

    #[test]
    fn new_secrets_are_long_random_and_distinct() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert!(a.starts_with("bsk_") && a.len() > 40);
        assert_ne!(a, b);
        assert_eq!(
            digest_of("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
