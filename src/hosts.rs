//! The public URLs this proxy answers to: the primary host (`CRATERE_SCHEME`, `CRATERE_HOST`,
//! `CRATERE_PORT`) and `CRATERE_ALTERNATE_HOSTS`. The sparse config.json and the git index's
//! config.json commits are written for each of them; a `Host` header is only ever matched
//! against this list, never reflected.

use crate::config::{HostPort, PublicConfig, Scheme};

/// The public URLs this proxy answers to: the primary host and the alternate hosts.
#[derive(Debug, Clone)]
pub struct PublicHosts {
    scheme: Scheme,
    primary: HostPort,
    alternates: Vec<HostPort>,
}

impl PublicHosts {
    pub fn new(config: &PublicConfig) -> PublicHosts {
        PublicHosts {
            scheme: config.scheme,
            primary: config.primary_host(),
            alternates: config.alternate_hosts.0.clone(),
        }
    }

    /// `scheme://authority` of the configured host the client named, or of the primary host
    /// when it named none of them. A `Host` header is never reflected as such.
    pub fn base_url_for(&self, requested: Option<&str>) -> String {
        let wanted = requested
            .and_then(|h| HostPort::parse(h).ok())
            .map(|h| h.authority(self.scheme));
        let chosen = wanted
            .and_then(|w| {
                std::iter::once(&self.primary)
                    .chain(&self.alternates)
                    .find(|h| h.authority(self.scheme) == w)
            })
            .unwrap_or(&self.primary);
        format!(
            "{}://{}",
            self.scheme.as_str(),
            chosen.authority(self.scheme)
        )
    }

    /// The primary public URL.
    pub fn primary_url(&self) -> String {
        self.base_url_for(None)
    }

    /// `scheme://authority` of every configured host, primary first.
    pub fn all_base_urls(&self) -> Vec<String> {
        std::iter::once(&self.primary)
            .chain(&self.alternates)
            .map(|h| format!("{}://{}", self.scheme.as_str(), h.authority(self.scheme)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(alternates: &str) -> PublicHosts {
        let mut c = crate::config::Config::for_dirs("c".into(), "i".into()).public;
        c.host = "proxy.example".into();
        c.port = 8000;
        c.alternate_hosts = crate::config::AlternateHosts(
            serde_json::from_str::<Vec<String>>(alternates)
                .unwrap()
                .iter()
                .map(|h| HostPort::parse(h).unwrap())
                .collect(),
        );
        PublicHosts::new(&c)
    }

    #[test]
    fn config_host_selection() {
        let h = hosts(r#"["mirror.internal:9000", "plain.internal"]"#);
        assert_eq!(h.primary_url(), "http://proxy.example:8000");
        assert_eq!(
            h.all_base_urls(),
            [
                "http://proxy.example:8000",
                "http://mirror.internal:9000",
                "http://plain.internal"
            ]
        );
        assert_eq!(
            h.base_url_for(Some("proxy.example:8000")),
            "http://proxy.example:8000"
        );
        assert_eq!(
            h.base_url_for(Some("Mirror.Internal:9000")),
            "http://mirror.internal:9000"
        );
        assert_eq!(
            h.base_url_for(Some("plain.internal")),
            "http://plain.internal"
        );
        assert_eq!(
            h.base_url_for(Some("plain.internal:80")),
            "http://plain.internal"
        );
        for spoofed in [
            "evil.example",
            "mirror.internal:9001",
            "a/b",
            "",
            "plain.internal:8000",
        ] {
            assert_eq!(
                h.base_url_for(Some(spoofed)),
                "http://proxy.example:8000",
                "{spoofed}"
            );
        }
    }
}
