//! The ACME account and the HTTPS client that talks to the CA.
//!
//! The account is created once per directory URL and its credentials kept in
//! `state_dir/acme/<directory host and path>/account.json` (0600), so staging
//! and production accounts never mix. Outbound HTTPS trusts the system roots
//! plus `acme.ca_roots`, and goes through an HTTP CONNECT proxy when
//! `HTTPS_PROXY`/`ALL_PROXY` say so (`NO_PROXY` honoured).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, BodyWrapper, ExternalAccountKey, HttpClient, NewAccount,
};
use rustls::crypto::CryptoProvider;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use tracing::{info, warn};

use super::transport::CaClient;
use crate::cluster::keys::{self, Key};
use crate::cluster::{Cluster, ClusterError};
use crate::config::Acme;
use crate::tls::store;

/// A CA (or proxy) that does not accept a connection in this time is down.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("acme.ca_roots {}: {message}", path.display())]
    Roots { path: PathBuf, message: String },
    #[error(
        "no trusted roots for the ACME server: the system has none and acme.ca_roots is not set"
    )]
    NoRoots,
    #[error("proxy {uri}: only http:// CONNECT proxies are supported")]
    Proxy { uri: String },
    #[error("TLS setup for the ACME client: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{}: {message}", path.display())]
    Credentials { path: PathBuf, message: String },
    #[error("ACME account: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("ACME account: {0}")]
    Cluster(#[from] ClusterError),
}

/// `state_dir/acme/<directory>/account.json`, the directory URL made a file name.
pub fn credentials_path(state_dir: &Path, directory: &str) -> PathBuf {
    let slug = keys::directory_slug(directory);
    state_dir.join("acme").join(slug).join("account.json")
}

/// The cluster's account for `config.directory`, registered (and shared)
/// by the first node that needs one; with the revision of its key, to
/// forget exactly that one if the CA does not know it. Two nodes that
/// register at once keep the one written first (the other stays unused).
pub async fn open_shared(
    config: &Acme,
    cluster: &Cluster,
    provider: &Arc<CryptoProvider>,
) -> Result<(Account, i64), AccountError> {
    let key = Key::Account(keys::directory_slug(&config.directory));
    let builder = || -> Result<_, AccountError> {
        Ok(Account::builder_with_http(http_client(config, provider)?))
    };
    let parse = |bytes: &[u8]| -> Result<AccountCredentials, AccountError> {
        serde_json::from_slice(bytes).map_err(|e| {
            AccountError::Cluster(ClusterError::Corrupt {
                key: cluster.key(&key),
                message: format!("unreadable account credentials: {e}"),
            })
        })
    };
    if let Some((bytes, revision)) = cluster.get(&key).await? {
        let account = builder()?.from_credentials(parse(&bytes)?).await?;
        return Ok((account, revision));
    }
    let (account, credentials) = register(config, builder()?).await?;
    let json = serde_json::to_vec(&credentials).map_err(|e| ClusterError::Corrupt {
        key: cluster.key(&key),
        message: e.to_string(),
    })?;
    // Registered at the CA: the credentials must reach the store, or the
    // next attempt registers another account (the CA limits how many).
    // The write is idempotent: tried again for a while.
    let mut tries = 0;
    let (kept, revision) = loop {
        match cluster.put_if_absent(&key, json.clone()).await {
            Ok(done) => break done,
            Err(e @ ClusterError::Unreachable(_)) if tries < 3 => {
                tries += 1;
                warn!(error = %e, "the new ACME account could not be written to the cluster store yet; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if kept == json {
        info!(directory = %config.directory, account = %account.id(), "ACME account registered for the cluster");
        return Ok((account, revision));
    }
    let account = builder()?.from_credentials(parse(&kept)?).await?;
    Ok((account, revision))
}

/// A new account at `config.directory`, and its credentials.
async fn register(
    config: &Acme,
    builder: instant_acme::AccountBuilder,
) -> Result<(Account, AccountCredentials), AccountError> {
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contact,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let eab = config
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
    Ok(builder
        .create(&new, config.directory.clone(), eab.as_ref())
        .await?)
}

/// Loads the stored account for `config.directory`, or registers one and
/// stores its credentials before using it. `stored: false` registers anew
/// whatever is stored (the CA rejected it, and it could not be moved aside).
pub async fn open(
    config: &Acme,
    state_dir: &Path,
    provider: &Arc<CryptoProvider>,
    stored: bool,
) -> Result<Account, AccountError> {
    let path = credentials_path(state_dir, &config.directory);
    let builder = || -> Result<_, AccountError> {
        Ok(Account::builder_with_http(http_client(config, provider)?))
    };
    let read = if stored {
        std::fs::read(&path)
    } else {
        Err(std::io::ErrorKind::NotFound.into())
    };
    match read {
        Ok(bytes) => {
            let credentials: AccountCredentials =
                serde_json::from_slice(&bytes).map_err(|e| AccountError::Credentials {
                    path: path.clone(),
                    message: format!("unreadable account credentials: {e}"),
                })?;
            Ok(builder()?.from_credentials(credentials).await?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (account, credentials) = register(config, builder()?).await?;
            let json = serde_json::to_vec(&credentials).map_err(|e| AccountError::Credentials {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let written = path
                .parent()
                .map(store::create_private_dir)
                .unwrap_or(Ok(()))
                .and_then(|()| store::write_atomic(&path, &json, 0o600));
            if let Err(e) = written {
                // The CA has the account now; without its key we would
                // register a new one on every start. Say so loudly.
                warn!(path = %path.display(), error = %e, "cannot store the new ACME account's credentials");
            } else {
                info!(directory = %config.directory, account = %account.id(), path = %path.display(), "ACME account registered");
            }
            Ok(account)
        }
        Err(e) => Err(AccountError::Credentials {
            path,
            message: format!("cannot read: {e}"),
        }),
    }
}

/// HTTPS to the CA: system roots plus `ca_roots`, HTTP/1.1, through a CONNECT
/// proxy when the environment names one for the directory's host; wrapped
/// in [`CaClient`] (errors that name the request, retries of what failed on
/// the way).
fn http_client(
    config: &Acme,
    provider: &Arc<CryptoProvider>,
) -> Result<Box<dyn HttpClient>, AccountError> {
    Ok(Box::new(CaClient::new(hyper_client(config, provider)?)))
}

fn hyper_client(
    config: &Acme,
    provider: &Arc<CryptoProvider>,
) -> Result<Box<dyn HttpClient>, AccountError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &config.ca_roots {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| AccountError::Roots {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(AccountError::Roots {
                path: path.clone(),
                message: "no PEM certificate in it".into(),
            });
        }
        let (_, bad) = roots.add_parsable_certificates(certs);
        if bad > 0 {
            return Err(AccountError::Roots {
                path: path.clone(),
                message: format!("{bad} certificate(s) in it are not usable roots"),
            });
        }
    }
    if roots.is_empty() {
        return Err(AccountError::NoRoots);
    }
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1();
    let executor = TokioExecutor::new();
    let mut tcp = HttpConnector::new();
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.enforce_http(false);
    let proxy = config
        .directory
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| Matcher::from_env().intercept(&uri));
    match proxy {
        Some(proxy) => {
            let uri = proxy.uri().clone();
            if uri.scheme_str() != Some("http") {
                return Err(AccountError::Proxy {
                    uri: uri.to_string(),
                });
            }
            info!(proxy = %uri, "ACME requests go through a proxy");
            let mut tunnel = Tunnel::new(uri, tcp);
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let connector = https.wrap_connector(tunnel);
            Ok(Box::new(
                Client::builder(executor).build::<_, BodyWrapper<Bytes>>(connector),
            ))
        }
        None => {
            let connector = https.wrap_connector(tcp);
            Ok(Box::new(
                Client::builder(executor).build::<_, BodyWrapper<Bytes>>(connector),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_and_production_accounts_live_apart() {
        let state = Path::new("/var/lib/portcullis");
        let prod = credentials_path(state, crate::config::defaults::LETSENCRYPT);
        let staging = credentials_path(state, crate::config::defaults::LETSENCRYPT_STAGING);
        assert_ne!(prod, staging);
        assert_eq!(
            prod,
            Path::new(
                "/var/lib/portcullis/acme/acme-v02.api.letsencrypt.org_directory/account.json"
            )
        );
        let pebble = credentials_path(state, "https://127.0.0.1:14000/dir");
        assert!(pebble.ends_with("acme/127.0.0.1_14000_dir/account.json"));
    }
}
