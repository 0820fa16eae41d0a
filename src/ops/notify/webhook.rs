//! The webhook client: each notification as JSON, POSTed over HTTP or
//! HTTPS (native roots, or extra ones), within a deadline; its URL is shown
//! in logs without the path, which is often the webhook's secret.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::BodyWrapper;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::fmt::Write as _;

/// The webhook request, connect to response headers.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a webhook POST failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum WebhookError {
    #[error("{url}: {message}")]
    Request { url: String, message: String },
    #[error("{url}: no response within {WEBHOOK_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
}

type HttpClient = Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

pub(super) struct Webhook {
    uri: http::Uri,
    /// The URL for log lines: scheme and authority only, since a webhook's
    /// path often is its secret (Slack, Mattermost).
    pub(super) shown: String,
    client: HttpClient,
}

impl Webhook {
    pub(super) fn new(url: &str, ca_roots: Option<&Path>) -> Result<Webhook, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("notify.webhook {url:?}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "notify.webhook {url:?}: expected http:// or https://"
                ))
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("notify.webhook {url:?}: no host"))?;
        let host_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, h)| h);
        let path = uri.path_and_query().map_or("", |p| p.as_str());
        let shown = format!(
            "{}://{host_port}{}",
            uri.scheme_str().unwrap_or("http"),
            if path.is_empty() || path == "/" {
                ""
            } else {
                "/…"
            }
        );
        let mut roots = RootCertStore::empty();
        if https {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
        if let Some(path) = ca_roots {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            roots.add_parsable_certificates(certs);
        }
        if https && roots.is_empty() {
            return Err(format!(
                "notify.webhook {shown}: no trusted roots for HTTPS (the system has none)"
            ));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup for notify.webhook: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(WEBHOOK_TIMEOUT));
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Webhook { uri, shown, client })
    }

    pub(super) async fn post(&self, json: &serde_json::Value) -> Result<(), WebhookError> {
        let url = self.shown.clone();
        let body = serde_json::to_vec(json).map_err(|e| WebhookError::Request {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let request = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .body(BodyWrapper::from(body))
            .map_err(|e| WebhookError::Request {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let response = tokio::time::timeout(WEBHOOK_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| WebhookError::Timeout { url: url.clone() })?
            .map_err(|e| WebhookError::Request {
                url: url.clone(),
                message: error_chain(&e),
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status { url, status })
        }
    }
}

/// An error and its sources, `: `-joined (hyper's own message is only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    // Bounded: error chains are short, and a cycle would be a bug elsewhere.
    for _ in 0..8 {
        let Some(inner) = source else { break };
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_checked_and_shown_without_their_path() {
        let w = Webhook::new("http://127.0.0.1:8080/hooks/T0/B1/secret", None).unwrap();
        assert_eq!(w.shown, "http://127.0.0.1:8080/…");
        let w = Webhook::new("http://user:pw@127.0.0.1:8080", None).unwrap();
        assert_eq!(w.shown, "http://127.0.0.1:8080");
        assert!(Webhook::new("ftp://127.0.0.1/", None).is_err());
        assert!(Webhook::new("not a url", None).is_err());
        let missing = Webhook::new(
            "https://127.0.0.1/",
            Some(Path::new("/nonexistent/roots.pem")),
        );
        assert!(missing.err().unwrap().contains("/nonexistent/roots.pem"));
    }
}
