//! One order, start to finish: the account, a new order (naming the
//! certificate it replaces), each authorization's challenge answered, the
//! CSR finalized, the certificate checked and stored. What fails on the way
//! is made again where the CA's state shows it was not taken.

use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeStatus, ChallengeType,
    Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use tracing::{debug, info, warn};

use super::retry::{self, retrying};
use super::{account, challenge, dns01, rollover, store, transport, Lineage, Shared};
use crate::cluster::keys::Key;
use crate::cluster::lock::Lock;
use crate::cluster::ClusterError;
use crate::config::names::{self, HostPattern};
use crate::config::{Challenge, Dns, KeyPolicy};

/// A new key of `key_type`.
fn new_key(key_type: crate::config::KeyType) -> Result<rcgen::KeyPair, rcgen::Error> {
    rcgen::KeyPair::generate_for(crate::tls::certs::key_algorithm(key_type))
}

/// How long the CA may take to settle an order while we poll it.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Account(#[from] account::AccountError),
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    #[error("{name}: the CA offers none of the configured challenges ({offered})")]
    NoChallenge { name: String, offered: String },
    #[error("{name}: authorization is {status}")]
    Authorization { name: String, status: String },
    #[error("order invalid: {0}")]
    Invalid(String),
    #[error(transparent)]
    Challenge(#[from] challenge::ChallengeError),
    #[error("key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("the issued certificate is unusable: {0}")]
    Store(#[from] store::StoreError),
    #[error("no result within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the order lock's lease ran out (etcd did not answer): order abandoned, so that no two nodes order at once; tried again later")]
    LockLost,
    #[error("dns-01: {0}")]
    Dns01(#[from] dns01::Dns01Error),
    #[error("dns-01 needs acme.dns (or the host's acme.dns): where to add the record")]
    NoDnsSettings,
}

/// A certificate just issued and checked, not stored yet.
pub(super) struct Issued {
    pub(super) cert: crate::tls::certs::LoadedCert,
    pub(super) chain_pem: String,
    pub(super) key_pem: String,
    pub(super) meta: store::Meta,
}

/// A certificate served but not stored, kept to be stored later.
#[derive(Debug)]
pub struct Unstored {
    pub(super) chain_pem: String,
    pub(super) key_pem: String,
    pub(super) meta: store::Meta,
    pub(super) serial: String,
}

impl IssueError {
    /// The CA does not know the stored account (deactivated, or a test CA
    /// that restarted): a new one must be registered.
    pub(super) fn is_unknown_account(&self) -> bool {
        matches!(self, IssueError::Acme(instant_acme::Error::Api(p))
            if p.r#type.as_deref().is_some_and(|t| t.ends_with(":accountDoesNotExist")))
    }

    /// How long the CA asked us to wait (`Retry-After` on its error answer).
    pub(super) fn retry_after(&self) -> Option<Duration> {
        let acme = match self {
            IssueError::Acme(e) | IssueError::Account(account::AccountError::Acme(e)) => e,
            _ => return None,
        };
        match acme {
            instant_acme::Error::Other(inner) => inner
                .downcast_ref::<transport::CaError>()
                .and_then(|ca| ca.retry_after),
            _ => None,
        }
    }
}

impl Shared {
    /// Drops `failed` (an account the CA no longer knows) and moves its
    /// stored credentials aside (kept, not deleted, in case an operator
    /// wants them back). Another host that failed with the same account a
    /// moment later finds it gone already, and keeps the new one.
    async fn forget_account(&self, failed: &Account) {
        let mut cache = self.account.lock().await;
        if cache.account.as_ref().is_none_or(|a| a.id() != failed.id()) {
            return;
        }
        cache.account = None;
        if let Some(cluster) = &self.cluster {
            let key = Key::Account(crate::cluster::keys::directory_slug(&self.config.directory));
            let revision = cache.shared_revision.take().unwrap_or_default();
            match cluster.delete_if_unchanged(&key, revision).await {
                Ok(()) => {
                    warn!("the CA does not know the cluster's ACME account; registering a new one")
                }
                Err(e) => {
                    warn!(error = %e, "the CA does not know the cluster's ACME account, and it cannot be removed from the store; the next attempt tries again")
                }
            }
            return;
        }
        let path = account::credentials_path(&self.state_dir, &self.config.directory);
        let suffix = format!(
            "rejected-{}-{:08x}",
            crate::tls::certs::unix_now(),
            fastrand::u32(..)
        );
        let aside = path.with_extension(suffix);
        match std::fs::rename(&path, &aside) {
            Ok(()) => {
                warn!(moved_to = %aside.display(), "the CA does not know the stored ACME account; registering a new one")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!("the CA does not know the ACME account; registering a new one")
            }
            Err(e) => {
                cache.stored_rejected = true;
                warn!(path = %path.display(), error = %e, "the CA does not know the stored ACME account, and its credentials cannot be moved aside; registering a new one")
            }
        }
    }

    pub(super) async fn account(&self) -> Result<Account, account::AccountError> {
        let mut cache = self.account.lock().await;
        if let Some(a) = &cache.account {
            return Ok(a.clone());
        }
        let stored = !cache.stored_rejected;
        let mut again = retry::Again::new("account");
        let a = loop {
            let opened = match &self.cluster {
                Some(c) => account::open_shared(&self.config, c, &self.provider)
                    .await
                    .map(|(a, rev)| (a, Some(rev))),
                None => account::open(&self.config, &self.state_dir, &self.provider, stored)
                    .await
                    .map(|a| (a, None)),
            };
            match opened {
                Ok(a) => break a,
                // A lost answer to a registration may leave an unused
                // account at the CA: harmless, and rare.
                Err(account::AccountError::Acme(e)) => again.after(e).await?,
                Err(e) => return Err(e),
            }
        };
        let (a, revision) = a;
        if !stored {
            cache.stored_rejected = false;
        }
        cache.shared_revision = revision;
        cache.account = Some(a.clone());
        Ok(a)
    }

    /// An account, then an order for `names`; an account the CA has
    /// forgotten (deactivated, or a CA that lost its database, as a
    /// restarted test CA does) is registered anew and the order placed
    /// again, once, now.
    pub(super) async fn order(
        &self,
        lineage: &Lineage,
        replaces: Option<CertificateIdentifier<'static>>,
        challenges: &[Challenge],
        lock: Option<&Lock>,
    ) -> Result<Issued, IssueError> {
        let account = self.account().await?;
        match self
            .issue(&account, lineage, replaces.clone(), challenges, lock)
            .await
        {
            Err(e) if e.is_unknown_account() => {
                self.forget_account(&account).await;
                let account = self.account().await?;
                let again = self
                    .issue(&account, lineage, replaces, challenges, lock)
                    .await;
                if again.as_ref().is_err_and(IssueError::is_unknown_account) {
                    self.forget_account(&account).await;
                }
                again
            }
            other => other,
        }
    }

    /// Orders a certificate for the lineage's names, with a key of its
    /// type, with `account`, and checks it.
    async fn issue(
        &self,
        account: &Account,
        lineage: &Lineage,
        replaces: Option<CertificateIdentifier<'static>>,
        challenges: &[Challenge],
        lock: Option<&Lock>,
    ) -> Result<Issued, IssueError> {
        let names = &lineage.names[..];
        let key_type = lineage.key_type;
        let mut order = self.new_order(account, names, replaces).await?;
        let first = names.first().map(ToString::to_string).unwrap_or_default();
        let dns = self.config.dns_for(&first);
        let posted = self.authorize(&mut order, challenges, lock, dns).await?;
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .timeout(ORDER_TIMEOUT);
        let status = retrying!("order status", order.poll_ready(&retry))?;
        if status != OrderStatus::Ready {
            return Err(IssueError::Invalid(problems(&mut order).await));
        }
        drop(posted);

        let policy = self.config.key_for(&first);
        let mut rolled = false;
        let key = match policy {
            KeyPolicy::Reuse => match self.stored_key(lineage) {
                Some(k) => {
                    debug!("reusing the certificate's key (acme key: reuse): TLSA 3 1 1 records stay valid");
                    k
                }
                None => new_key(key_type)?,
            },
            KeyPolicy::Rollover => match self.next_key_if_served(&first).await {
                Some(k) => {
                    rolled = true;
                    k
                }
                None => match self.stored_key(lineage) {
                    Some(k) => k,
                    None => new_key(key_type)?,
                },
            },
            KeyPolicy::New => new_key(key_type)?,
        };
        let csr = csr(names, &key)?;
        finalize(&mut order, &csr).await?;
        let chain = retrying!("certificate", order.poll_certificate(&retry))?;
        let key_pem = key.serialize_pem();
        let cert = store::check(&self.state_dir, lineage, &chain, &key_pem, &self.provider)?;
        if policy == KeyPolicy::Rollover {
            // The next key is this certificate's now (or still to come):
            // there is always one waiting to be published.
            let made = if rolled {
                info!("key rollover: the certificate has the next key now; a new next key is made");
                rollover::rolled(&self.state_dir, &first, key_type)
            } else {
                rollover::ensure(&self.state_dir, &first, key_type)
            };
            match made {
                Ok((next, true)) => self.announce_next_key(names, &first, &next),
                Ok((_, false)) => {}
                Err(e) => warn!(error = %e, "key rollover: no next key could be kept"),
            }
        }
        let meta = store::Meta {
            names: names::to_strings(names),
            directory: self.config.directory.clone(),
            issued_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        Ok(Issued {
            cert,
            chain_pem: chain,
            key_pem,
            meta,
        })
    }

    /// The next key of a `key: rollover` host, once its TLSA record has
    /// been served long enough (looked at now).
    async fn next_key_if_served(&self, first: &str) -> Option<rcgen::KeyPair> {
        let tlsa = self.config.tlsa.as_ref()?;
        let owners = &self.config.per_host.get(first)?.tlsa_owners;
        let next = rollover::look(&self.state_dir, first, tlsa, owners).await?;
        let from = rollover::usable_from(&next, tlsa.wait_ttls)?;
        if from > SystemTime::now() {
            info!(next_key = %next.spki_sha256, "key rollover: the next key's TLSA record is served, but not for long enough yet: the current key again");
            return None;
        }
        rollover::key(&self.state_dir, first)
    }

    /// Says what to publish for a next key just made (a notification).
    fn announce_next_key(&self, names: &[HostPattern], first: &str, next: &rollover::Next) {
        let owners = self
            .config
            .per_host
            .get(first)
            .map(|h| h.tlsa_owners.clone())
            .unwrap_or_default();
        let records = owners
            .iter()
            .map(|o| format!("{o}. IN TLSA 3 1 1 {}", next.spki_sha256))
            .collect();
        let (check, wait_ttls) = self.config.tlsa.as_ref().map_or((Vec::new(), 2), |t| {
            (
                t.check.iter().map(ToString::to_string).collect(),
                t.wait_ttls,
            )
        });
        self.hooks.report(super::Event::NextKey {
            names: names::to_strings(names),
            records,
            check,
            wait_ttls,
        });
    }

    /// The stored certificate's key, when it is of the lineage's key type;
    /// `None` (and a new key) when there is none, it does not load, or the
    /// type changed — said in the log, as the TLSA record must change then.
    fn stored_key(&self, lineage: &Lineage) -> Option<rcgen::KeyPair> {
        let key_type = lineage.key_type;
        let path = store::key_path(&self.state_dir, lineage);
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "acme key: reuse, but the stored key cannot be read: a new key (publish its TLSA record)");
                return None;
            }
        };
        let key = match rcgen::KeyPair::from_pem(&pem) {
            Ok(k) => k,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "acme key: reuse, but the stored key does not load: a new key (publish its TLSA record)");
                return None;
            }
        };
        if key.algorithm() != crate::tls::certs::key_algorithm(key_type) {
            warn!(key_type = key_type.as_str(), "acme key: reuse, but the stored key is of another type than acme.key_types says: a new key (publish its TLSA record)");
            return None;
        }
        Some(key)
    }

    /// A new order for `names` (naming the certificate it `replaces`, where
    /// the CA takes that; a second order without it, paid for from the
    /// order budget, where it does not).
    async fn new_order(
        &self,
        account: &Account,
        names: &[HostPattern],
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<instant_acme::Order, IssueError> {
        let identifiers: Vec<Identifier> = names
            .iter()
            .map(|n| Identifier::Dns(n.to_string()))
            .collect();
        let new = || match &self.config.profile {
            Some(p) => NewOrder::new(&identifiers).profile(p),
            None => NewOrder::new(&identifiers),
        };
        let Some(id) = replaces else {
            return Ok(retrying!("new order", account.new_order(&new()))?);
        };
        let replacing = retrying!("new order", account.new_order(&new().replaces(id.clone())));
        match replacing {
            Ok(o) => Ok(o),
            // The CA may refuse the `replaces` itself (already replaced, an
            // id it does not know): an order without it is still a good one.
            Err(instant_acme::Error::Api(problem))
                if problem.r#type.as_deref().is_some_and(|t| {
                    t.ends_with(":alreadyReplaced") || t.ends_with(":malformed")
                }) =>
            {
                warn!(problem = %problem, "the CA refused the order with `replaces`; ordering without it");
                Ok(retrying!("new order", account.new_order(&new()))?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Answers a challenge of each pending authorization of `order`, in the
    /// order of preference `challenges`; the answers stay up as long as the
    /// returned guards live. A fetch that failed on the way is made again;
    /// so is a challenge whose "ready" got no answer, unless the CA's state
    /// shows it was taken (made twice, the CA would refuse it).
    async fn authorize(
        &self,
        order: &mut instant_acme::Order,
        challenges: &[Challenge],
        lock: Option<&Lock>,
        dns: Option<&Dns>,
    ) -> Result<Vec<challenge::Posted>, IssueError> {
        let mut posted = Vec::new();
        // Names whose challenge response is up, and those also set ready.
        let (mut up, mut ready): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        // Names whose "ready" got no answer: look before sending it again.
        let mut unsure: Vec<String> = Vec::new();
        // Each fetch or challenge gets its own retries: a fresh state after
        // every success.
        let mut fetch = retry::Again::new("authorization");
        let mut set = retry::Again::new("challenge");
        'fetch: loop {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = match authz {
                    Ok(a) => a,
                    Err(e) => {
                        fetch.after(e).await?;
                        continue 'fetch;
                    }
                };
                fetch = retry::Again::new("authorization");
                let name = authz.identifier().to_string();
                if ready.contains(&name) {
                    continue;
                }
                let was_unsure = unsure.contains(&name);
                if was_unsure {
                    retrying!("authorization", authz.refresh())?;
                    unsure.retain(|n| *n != name);
                }
                if validated(authz.status, &name)? {
                    ready.push(name);
                    continue;
                }
                let kind = pick(&authz, challenges).map_err(|offered| IssueError::NoChallenge {
                    name: name.clone(),
                    offered,
                })?;
                // The lost "ready" was taken when the CA is validating (or
                // has validated) it. (Boulder keeps a challenge pending while
                // it validates: sent again there, it just validates again.)
                let taken = authz.challenges.iter().any(|c| {
                    c.r#type == challenge_type(kind) && c.status != ChallengeStatus::Pending
                });
                if was_unsure && taken {
                    ready.push(name);
                    continue;
                }
                let Some(mut ch) = authz.challenge(challenge_type(kind)) else {
                    continue; // just picked
                };
                if !up.contains(&name) {
                    posted.push(self.post(&ch, kind, &name, lock, dns).await?);
                    up.push(name.clone());
                }
                debug!(name = %name, challenge = kind.as_str(), "challenge ready");
                match ch.set_ready().await {
                    Ok(()) => {
                        ready.push(name);
                        set = retry::Again::new("challenge");
                    }
                    Err(e) => {
                        set.after(e).await?;
                        unsure.push(name);
                        continue 'fetch;
                    }
                }
            }
            return Ok(posted);
        }
    }

    /// Puts up the answer to `ch` for `name`: the key authorization at its
    /// http-01 token, or a tls-alpn-01 certificate; it stays up as long as
    /// the returned guard lives. In a cluster, it is published too, for
    /// every node to answer (until the order lock goes).
    async fn post(
        &self,
        ch: &instant_acme::ChallengeHandle<'_>,
        kind: Challenge,
        name: &str,
        lock: Option<&Lock>,
        dns: Option<&Dns>,
    ) -> Result<challenge::Posted, IssueError> {
        let key_auth = ch.key_authorization();
        Ok(match kind {
            Challenge::Http01 => {
                if let Some(lock) = lock {
                    let key = Key::Http01(ch.token.clone());
                    lock.post(&key, key_auth.as_str()).await?;
                }
                self.challenges.post_http(&ch.token, key_auth.as_str())
            }
            Challenge::TlsAlpn01 => {
                let digest = key_auth.digest();
                if let Some(lock) = lock {
                    let key = Key::TlsAlpn01(name.to_ascii_lowercase());
                    lock.post(&key, &crate::tls::certs::hex(digest.as_ref()))
                        .await?;
                }
                let cert = challenge::tls_alpn_cert(name, digest.as_ref(), &self.provider)?;
                self.challenges.post_tls_alpn(name, cert)
            }
            // In DNS, for every node and the CA alike.
            Challenge::Dns01 => {
                let dns = dns.ok_or(IssueError::NoDnsSettings)?;
                let value = key_auth.dns_value();
                let published = dns01::publish(dns, name, &value, &self.state_dir).await?;
                self.challenges.hold_dns(published)
            }
        })
    }
}

/// Whether an authorization is validated already (maybe earlier, with
/// another challenge type: then it lists only that one, RFC 8555 §7.1.4);
/// `false` while pending; an error in any other state.
fn validated(status: AuthorizationStatus, name: &str) -> Result<bool, IssueError> {
    match status {
        AuthorizationStatus::Pending => Ok(false),
        AuthorizationStatus::Valid => Ok(true),
        other => Err(IssueError::Authorization {
            name: name.to_string(),
            status: format!("{other:?}").to_lowercase(),
        }),
    }
}

/// The first of `challenges` (in order of preference) the authorization
/// offers; `Err` lists what it offers instead.
fn pick(
    authz: &instant_acme::AuthorizationHandle<'_>,
    challenges: &[Challenge],
) -> Result<Challenge, String> {
    let offers = |c: &Challenge| {
        authz
            .challenges
            .iter()
            .any(|x| x.r#type == challenge_type(*c))
    };
    challenges.iter().copied().find(offers).ok_or_else(|| {
        let offered: Vec<String> = authz
            .challenges
            .iter()
            .map(|c| format!("{:?}", c.r#type))
            .collect();
        offered.join(", ")
    })
}

/// Finalizes `order` with `csr`. When that got no answer (or a 5xx), the
/// CA may have taken it: its order state says whether to send it again
/// (`ready`) or go on to the certificate (`processing`, `valid`); sent
/// twice, the CA would refuse the second and the certificate it issued for
/// the first would be thrown away.
async fn finalize(order: &mut instant_acme::Order, csr: &[u8]) -> Result<(), IssueError> {
    let mut again = retry::Again::new("finalize");
    loop {
        let Err(e) = order.finalize_csr(csr).await else {
            return Ok(());
        };
        again.after(e).await?;
        let status = retrying!("order status", order.refresh())?.status;
        match status {
            OrderStatus::Ready => continue,
            OrderStatus::Processing | OrderStatus::Valid => return Ok(()),
            _ => return Err(IssueError::Invalid(problems(order).await)),
        }
    }
}

/// A CSR naming every host name as a SAN and nothing else.
fn csr(names: &[HostPattern], key: &rcgen::KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(names::to_strings(names))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

fn challenge_type(c: Challenge) -> ChallengeType {
    match c {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Dns01 => ChallengeType::Dns01,
    }
}

/// The CA's problem documents for an invalid order: the order's own and each
/// failed challenge's.
async fn problems(order: &mut instant_acme::Order) -> String {
    let mut out = Vec::new();
    if let Some(e) = &order.state().error {
        out.push(e.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let name = authz.identifier().to_string();
        if let Ok(state) = authz.refresh().await {
            for c in &state.challenges {
                if let Some(e) = &c.error {
                    out.push(format!("{name} {:?}: {e}", c.r#type));
                }
            }
        }
    }
    if out.is_empty() {
        "the CA gave no reason".into()
    } else {
        out.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn every_key_type_makes_a_csr_for_every_name() {
        let names: Vec<HostPattern> = ["mail.example.test", "imap.example.test"]
            .iter()
            .map(|n| HostPattern::parse(n).unwrap())
            .collect();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let der = csr(&names, &key).unwrap();
            let (_, req) =
                x509_parser::certification_request::X509CertificationRequest::from_der(&der)
                    .unwrap();
            let mut sans = Vec::new();
            for ext in req.requested_extensions().into_iter().flatten() {
                if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
                    for n in &san.general_names {
                        sans.push(n.to_string());
                    }
                }
            }
            assert_eq!(
                sans,
                ["DNSName(mail.example.test)", "DNSName(imap.example.test)"],
                "{alg:?}"
            );
        }
    }
}
