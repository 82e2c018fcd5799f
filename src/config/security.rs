//! `[security]` and the TLS keys of `[server]`: API keys with scopes and per-key policy,
//! rate limits, the client allowlist, CORS, the audit log and the request limits, validated
//! into [`SecurityConfig`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::duration::parse_timeout;
use super::ConfigError;
use crate::models::{Digest, ModelName};

/// `[security]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurity {
    #[serde(default)]
    pub(crate) keys: Vec<RawKey>,
    pub(crate) ip_rpm: Option<u32>,
    pub(crate) allow_cidrs: Option<Vec<String>>,
    pub(crate) cors_origins: Option<Vec<String>>,
    pub(crate) metrics_public: Option<bool>,
    pub(crate) audit_log: Option<String>,
    pub(crate) audit_prompts: Option<bool>,
    pub(crate) audit_max_bytes: Option<u64>,
    pub(crate) audit_keep: Option<u32>,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) request_timeout: Option<String>,
    pub(crate) header_timeout: Option<String>,
    pub(crate) max_connections: Option<usize>,
}

/// `[[security.keys]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKey {
    pub(crate) name: String,
    pub(crate) sha256: String,
    pub(crate) scopes: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) models: Vec<String>,
    #[serde(default)]
    pub(crate) local_only: bool,
    pub(crate) rpm: Option<u32>,
    pub(crate) tpm: Option<u32>,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Generate, embed, list and show models.
    Inference,
    /// The admin API, metrics, and changes to the model store.
    Admin,
}

/// One API key. The secret itself is never stored: only its sha256.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// Shown in the audit log and metrics.
    pub name: String,
    /// sha256 of the secret.
    pub sha256: Digest,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The models it may use; empty means all.
    pub models: Vec<ModelName>,
    /// Its requests never leave the machine.
    pub local_only: bool,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Prompt plus completion tokens per minute.
    pub tpm: Option<u32>,
}

/// TLS for the listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(ipnet::IpNet);

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare address.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let t = text.trim();
        t.parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(Cidr)
            .map_err(|_| format!("`{text}` is not an IP address or network (e.g. 10.0.0.0/8)"))
    }

    /// Whether `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

/// The audit log.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The JSON-lines file.
    pub path: PathBuf,
    /// Also record prompt text (off by default: only its sha256 and length).
    pub prompts: bool,
    /// Rotate when the file reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` … `.N`).
    pub keep: u32,
}

/// Everything about who may do what.
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    /// API keys; none means no authentication (only allowed on loopback or with --insecure).
    pub keys: Vec<KeyConfig>,
    /// Requests per minute per client IP.
    pub ip_rpm: Option<u32>,
    /// Client networks allowed to connect; empty means all.
    pub allow_cidrs: Vec<Cidr>,
    /// `/metrics` without a key.
    pub metrics_public: bool,
    /// The audit log, if any.
    pub audit: Option<AuditConfig>,
    /// Most tokens one answer may ask for (and the limit of answers that set none).
    pub max_tokens: Option<u32>,
    /// Most time until a response starts.
    pub request_timeout: Option<Duration>,
    /// Most time a client may take to send its request headers (slow-loris guard).
    pub header_timeout: Duration,
    /// Most connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// TLS, if configured.
    pub tls: Option<TlsConfig>,
}

const DEFAULT_AUDIT_MAX: u64 = 100 * 1024 * 1024;
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Validates `[security]` plus the TLS paths. Paths are relative to `base`.
pub(crate) fn load(
    raw: RawSecurity,
    tls: (Option<String>, Option<String>, Option<String>),
    origin: &str,
    base: &Path,
    resolve: impl Fn(&str, &Path) -> PathBuf,
) -> Result<SecurityConfig, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key,
        message,
    };
    let mut keys: Vec<KeyConfig> = Vec::with_capacity(raw.keys.len());
    for (i, k) in raw.keys.into_iter().enumerate() {
        let key = |f: &str| format!("security.keys[{i}].{f}");
        if k.name.trim().is_empty() {
            return Err(invalid(key("name"), "a key needs a name".into()));
        }
        if keys.iter().any(|o| o.name == k.name) {
            return Err(invalid(key("name"), format!("`{}` is used twice", k.name)));
        }
        let sha256 = Digest::parse(&k.sha256).map_err(|_| {
            invalid(
                key("sha256"),
                "the sha256 hex digest of the secret (run `backstop keys new`)".into(),
            )
        })?;
        if keys.iter().any(|o| o.sha256 == sha256) {
            return Err(invalid(
                key("sha256"),
                "two keys have the same secret".into(),
            ));
        }
        let scopes = match k.scopes {
            None => vec![Scope::Inference],
            Some(list) => list
                .iter()
                .map(|s| match s.as_str() {
                    "inference" => Ok(Scope::Inference),
                    "admin" => Ok(Scope::Admin),
                    other => Err(invalid(
                        key("scopes"),
                        format!("`{other}` is not one of \"inference\", \"admin\""),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let models = k
            .models
            .iter()
            .map(|m| ModelName::parse(m).map_err(|e| invalid(key("models"), e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        for (v, f) in [(k.rpm, "rpm"), (k.tpm, "tpm")] {
            if v == Some(0) {
                return Err(invalid(key(f), "must be at least 1".into()));
            }
        }
        keys.push(KeyConfig {
            name: k.name,
            sha256,
            scopes,
            models,
            local_only: k.local_only,
            rpm: k.rpm,
            tpm: k.tpm,
        });
    }
    if raw.ip_rpm == Some(0) {
        return Err(invalid(
            "security.ip_rpm".into(),
            "must be at least 1".into(),
        ));
    }
    let allow_cidrs = raw
        .allow_cidrs
        .unwrap_or_default()
        .iter()
        .map(|c| Cidr::parse(c).map_err(|m| invalid("security.allow_cidrs".into(), m)))
        .collect::<Result<Vec<_>, _>>()?;
    let audit = raw.audit_log.as_deref().map(|p| AuditConfig {
        path: resolve(p, base),
        prompts: raw.audit_prompts.unwrap_or(false),
        max_bytes: raw.audit_max_bytes.unwrap_or(DEFAULT_AUDIT_MAX).max(4096),
        keep: raw.audit_keep.unwrap_or(5),
    });
    let timeout = |v: &Option<String>, k: &str| match v {
        Some(t) => parse_timeout(t)
            .map(Some)
            .map_err(|m| invalid(format!("security.{k}"), m)),
        None => Ok(None),
    };
    let request_timeout = timeout(&raw.request_timeout, "request_timeout")?;
    let header_timeout =
        timeout(&raw.header_timeout, "header_timeout")?.unwrap_or(DEFAULT_HEADER_TIMEOUT);
    if raw.max_tokens == Some(0) || raw.max_connections == Some(0) {
        return Err(invalid(
            "security".into(),
            "max_tokens and max_connections must be at least 1".into(),
        ));
    }
    let tls = match tls {
        (None, None, None) => None,
        (Some(cert), Some(key), ca) => {
            let cert = resolve(&cert, base);
            let key = resolve(&key, base);
            let client_ca = ca.map(|c| resolve(&c, base));
            for (p, k) in [
                (Some(&cert), "tls_cert"),
                (Some(&key), "tls_key"),
                (client_ca.as_ref(), "client_ca"),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        return Err(invalid(
                            format!("server.{k}"),
                            format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
            }
            Some(TlsConfig {
                cert,
                key,
                client_ca,
            })
        }
        _ => {
            return Err(invalid(
                "server.tls_cert".into(),
                "TLS needs both tls_cert and tls_key (client_ca adds mTLS)".into(),
            ))
        }
    };
    Ok(SecurityConfig {
        keys,
        ip_rpm: raw.ip_rpm,
        allow_cidrs,
        metrics_public: raw.metrics_public.unwrap_or(false),
        audit,
        max_tokens: raw.max_tokens,
        request_timeout,
        header_timeout,
        max_connections: raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_what_they_should() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped IPv6"
        );
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }

    fn parse(text: &str) -> Result<SecurityConfig, ConfigError> {
        let raw: RawSecurity = toml::from_str(text).unwrap();
        load(
            raw,
            (None, None, None),
            "models.toml",
            Path::new("/etc"),
            |p, b| b.join(p),
        )
    }

    #[test]
    fn keys_are_read_with_their_policy_and_bad_ones_name_the_field() {
        let sha = "a".repeat(64);
        let c = parse(&format!("[[keys]]\nname = \"app\"\nsha256 = \"{sha}\"\nscopes = [\"inference\", \"admin\"]\nmodels = [\"smollm2\"]\nlocal_only = true\nrpm = 60\ntpm = 1000\n")).unwrap();
        let k = &c.keys[0];
        assert_eq!(k.scopes, vec![Scope::Inference, Scope::Admin]);
        assert!(k.local_only);
        assert_eq!(k.models[0].to_string(), "smollm2:latest");
        let e = parse("[[keys]]\nname = \"a\"\nsha256 = \"secret\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("security.keys[0].sha256"), "{e}");
        let e = parse(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = \"{sha}\"\nscopes = [\"root\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("root"), "{e}");
        assert!(parse(&format!("[[keys]]\nname = \"a\"\nsha256 = \"{sha}\"\n[[keys]]\nname = \"b\"\nsha256 = \"{sha}\"\n")).is_err());
    }
}
