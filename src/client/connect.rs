//! How a [`Client`](super::Client) reaches its server: the address, TLS, the transport's
//! settings.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::ClientError;

/// TLS settings of a connection: the Python client's `tls=` options.
///
/// The server is checked against `ca` (PEM), or against the bundled Mozilla roots
/// (`webpki-roots`, as grpc's own bundled roots) when none is given; `identity` is the client's
/// certificate for a server that asks for one (mutual TLS); `domain` is the name the server's
/// certificate must carry when it is not the address's host (e.g. a connection by IP).
#[derive(Clone, Default)]
pub struct TlsOptions {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca", &self.ca.as_ref().map(|_| "<pem>"))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsOptions {
    /// TLS checked against the bundled public roots.
    pub fn public_roots() -> Self {
        Self::default()
    }

    /// TLS checked against these PEM root certificates only.
    pub fn ca_pem(pem: impl Into<Vec<u8>>) -> Self {
        Self {
            ca: Some(pem.into()),
            ..Self::default()
        }
    }

    /// Presents this client certificate chain and key (PEM) to a server that asks for one.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// The name the server's certificate must carry (default: the address's host).
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new();
        c = match &self.ca {
            Some(pem) => c.ca_certificate(Certificate::from_pem(pem)),
            None => c.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            c = c.domain_name(d.clone());
        }
        c
    }
}

/// How to connect: [`Client::connect_with`](super::Client::connect_with).
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// TLS (`None`: plain HTTP/2, unless the address is `https://` or `grpcs://`, which means TLS
    /// with the public roots).
    pub tls: Option<TlsOptions>,
    /// How long the connection may take (`None`: the operating system's limit).
    pub connect_timeout: Option<Duration>,
}

/// The address as an endpoint URL, and whether its scheme asks for TLS: `host:port` and
/// `http://`/`grpc://` are plain, `https://`/`grpcs://` are TLS.
pub(super) fn endpoint_url(url: &str) -> (String, bool) {
    let url = url.trim_end_matches('/');
    for (scheme, tls) in [
        ("http://", false),
        ("grpc://", false),
        ("https://", true),
        ("grpcs://", true),
    ] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let s = if tls { "https" } else { "http" };
            return (format!("{s}://{rest}"), tls);
        }
    }
    (format!("http://{url}"), false)
}

/// Connects a channel to `url` with the project's HTTP/2 settings (the bench's raw client uses
/// it too, so that both measure the same transport).
pub(crate) async fn channel(url: &str, options: &ConnectOptions) -> Result<Channel, ClientError> {
    let (mut endpoint_url, scheme_tls) = endpoint_url(url);
    let tls = options
        .tls
        .clone()
        .or_else(|| scheme_tls.then(TlsOptions::public_roots));
    if tls.is_some() && !scheme_tls {
        // tonic only starts TLS on an https:// endpoint.
        endpoint_url = endpoint_url.replacen("http://", "https://", 1);
    }
    let connect = |source| ClientError::Connect {
        url: url.to_string(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(endpoint_url)
        .map_err(|e| ClientError::Protocol(format!("bad address `{url}`: {e}")))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(crate::server::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::server::HTTP2_CONNECTION_WINDOW))
        .max_frame_size(Some(crate::server::HTTP2_MAX_FRAME));
    if let Some(t) = options.connect_timeout {
        endpoint = endpoint.connect_timeout(t);
    }
    if let Some(tls) = &tls {
        endpoint = endpoint.tls_config(tls.config()).map_err(connect)?;
    }
    endpoint.connect().await.map_err(connect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_a_scheme_and_say_whether_they_want_tls() {
        assert_eq!(
            endpoint_url("127.0.0.1:1"),
            ("http://127.0.0.1:1".into(), false)
        );
        assert_eq!(endpoint_url("grpc://h:1/"), ("http://h:1".into(), false));
        assert_eq!(endpoint_url("https://h:1"), ("https://h:1".into(), true));
        assert_eq!(endpoint_url("grpcs://h:1"), ("https://h:1".into(), true));
    }
}
