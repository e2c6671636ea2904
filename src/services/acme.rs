//! The background service that keeps ACME certificates current.
//!
//! Each round it looks at every name of the running snapshot's plan: a
//! name with no stored certificate, one whose renewal time has come, or one
//! an admin asked to renew (`matrix-edge renew`) is ordered, unless it is
//! still backing off from a failure. A new certificate is written to the
//! state directory and swapped into the running SNI map; a failure is
//! logged with the CA's reason and the certificate in place keeps serving.

use crate::acme::schedule::{random_unit, renew_at, retry_after, Window};
use crate::acme::{AcmePlan, SharedChallenges};
use crate::edge::Edge;
use crate::observe::metrics::METRICS;
use crate::tls::CertifiedKey;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, CertificateIdentifier, ChallengeType, ExternalAccountKey,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Rounds happen at least this often, so a renewal window the CA moves
/// (ARI) or a marker left by `matrix-edge renew` is seen without a signal.
const LONGEST_SLEEP: i64 = 3600;

pub struct AcmeManager {
    pub edge: Arc<ArcSwap<Edge>>,
    pub challenges: SharedChallenges,
    /// Notified after every successful reload (and by `renew`, which reloads).
    pub wake: Arc<tokio::sync::Notify>,
}

/// A failed order in words: the CA's problem document or what went wrong on the way.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("{0}")]
    Ca(String),
    #[error("the CA gave no http-01 challenge for {0}")]
    NoHttpChallenge(String),
    #[error("validation failed: {0}")]
    Invalid(String),
    #[error("cannot store the certificate: {0}")]
    Store(#[from] std::io::Error),
    #[error("cannot make a key or request: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(error: instant_acme::Error) -> AcmeError {
        // hyper's errors say "client error (Connect)" and keep the cause below.
        let mut text = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(inner) = cause {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            cause = inner.source();
        }
        AcmeError::Ca(text)
    }
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    not_before: i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[async_trait]
impl BackgroundService for AcmeManager {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut account: Option<(AcmePlan, Account)> = None;
        let mut backoff: HashMap<String, Backoff> = HashMap::new();
        // Renewal times drawn once per certificate, so each round does not
        // draw a new point in the window.
        let mut drawn: HashMap<(String, i64), i64> = HashMap::new();
        loop {
            let edge = self.edge.load_full();
            let sleep = match &edge.tls.acme {
                Some(plan) => self.round(&edge, plan, &mut account, &mut backoff, &mut drawn).await,
                None => Duration::from_secs(LONGEST_SLEEP as u64),
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl AcmeManager {
    async fn round(
        &self,
        edge: &Edge,
        plan: &AcmePlan,
        account: &mut Option<(AcmePlan, Account)>,
        backoff: &mut HashMap<String, Backoff>,
        drawn: &mut HashMap<(String, i64), i64>,
    ) -> Duration {
        let now = unix_now();
        let mut next = now + LONGEST_SLEEP;
        let mut issued = false;
        for name in &plan.names {
            let stored = plan.store.load(name);
            // An admin's `renew` goes ahead at once, past any backoff, and
            // counts as one attempt: a failure backs off as usual.
            let requested = plan.store.renewal_requested(name);
            let due = match &stored {
                _ if requested => now,
                None => now,
                Some(cert) => {
                    let key = (name.clone(), cert.not_after_unix);
                    match drawn.get(&key) {
                        Some(at) => *at,
                        None => {
                            // Without the CA (down, unreachable) the two-thirds
                            // rule stands in, and the window is asked for again
                            // next round.
                            let (window, asked) = match self.account(plan, account).await {
                                Ok(acct) => (renewal_window(&acct, cert).await, true),
                                Err(_) => (None, false),
                            };
                            let at = renew_at(cert.not_before_unix, cert.not_after_unix, window, random_unit());
                            if asked {
                                drawn.insert(key, at);
                            }
                            at
                        }
                    }
                }
            };
            let waiting = if requested { 0 } else { backoff.get(name).map_or(0, |b| b.not_before) };
            let attempt_at = due.max(waiting);
            METRICS.operations.acme_next_renewal.with_label_values(&[name]).set(attempt_at);
            if attempt_at > now {
                next = next.min(attempt_at);
                continue;
            }
            if requested {
                plan.store.clear_request(name);
                log::info!("ACME: renewing {name} as requested");
            }
            let result = match self.account(plan, account).await {
                Ok(acct) => order(&acct, name, &self.challenges).await,
                Err(error) => Err(error),
            };
            match result {
                Ok((chain, key)) => {
                    if let Err(error) = plan.store.save(name, chain.as_bytes(), key.as_bytes()) {
                        log::error!("ACME: certificate for {name} issued but not stored: {error}");
                        continue;
                    }
                    backoff.remove(name);
                    issued = true;
                    METRICS.operations.acme_orders.with_label_values(&[name, "ok"]).inc();
                    let expiry = plan.store.load(name).map_or(0, |c| c.not_after_unix);
                    log::info!("ACME: new certificate for {name} from {} (expires at {expiry})", plan.directory_url);
                }
                Err(error) => {
                    let entry = backoff.entry(name.clone()).or_default();
                    entry.failures += 1;
                    let wait = retry_after(entry.failures, random_unit());
                    entry.not_before = now + wait.as_secs() as i64;
                    next = next.min(entry.not_before);
                    METRICS.operations.acme_orders.with_label_values(&[name, "error"]).inc();
                    METRICS.operations.acme_next_renewal.with_label_values(&[name]).set(entry.not_before);
                    let serving = if stored.is_some() { "the stored certificate" } else { "the placeholder" };
                    log::error!(
                        "ACME: order for {name} failed ({} in a row): {error}; {serving} keeps serving, next attempt in {}s",
                        entry.failures,
                        wait.as_secs()
                    );
                }
            }
        }
        if issued {
            // The snapshot in force now, which a reload may have replaced meanwhile.
            let current = self.edge.load_full();
            let target = if current.tls.acme.as_ref() == Some(plan) { &current } else { edge };
            match target.refresh_acme_certificates() {
                Ok(()) => log::info!("ACME: certificates swapped in; new handshakes use them"),
                Err(error) => log::error!("ACME: cannot load the new certificates: {error}"),
            }
        }
        Duration::from_secs((next - now).clamp(1, LONGEST_SLEEP) as u64)
    }

    /// The account for this plan's CA: from the state directory, else registered now.
    async fn account(&self, plan: &AcmePlan, cached: &mut Option<(AcmePlan, Account)>) -> Result<Account, AcmeError> {
        if let Some((_, account)) = cached.as_ref().filter(|(p, _)| same_account(p, plan)) {
            return Ok(account.clone());
        }
        let builder = || match &plan.ca_file {
            Some(file) => Account::builder_with_root(file),
            None => Account::builder(),
        };
        let stored = std::fs::read(plan.store.account_path()).ok();
        let account = match stored.and_then(|json| serde_json::from_slice::<AccountCredentials>(&json).ok()) {
            Some(credentials) => builder()?.from_credentials(credentials).await?,
            None => {
                let contact = format!("mailto:{}", plan.contact);
                let new =
                    NewAccount { contact: &[&contact], terms_of_service_agreed: true, only_return_existing: false };
                let eab = plan.external_account.as_ref().map(|(id, key)| ExternalAccountKey::new(id.clone(), key));
                let (account, credentials) = builder()?.create(&new, plan.directory_url.clone(), eab.as_ref()).await?;
                let json = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Ca(e.to_string()))?;
                plan.store.save_account(&json)?;
                log::info!("ACME: registered account {} at {}", account.id(), plan.directory_url);
                account
            }
        };
        *cached = Some((plan.clone(), account.clone()));
        Ok(account)
    }
}

fn same_account(a: &AcmePlan, b: &AcmePlan) -> bool {
    a.directory_url == b.directory_url && a.store == b.store && a.ca_file == b.ca_file
}

/// The CA's suggested window (RFC 9773) when it offers one.
async fn renewal_window(account: &Account, cert: &CertifiedKey) -> Option<Window> {
    let leaf = cert.chain.first()?;
    let key_id = leaf.authority_key_id()?.as_slice().to_vec();
    let mut serial = leaf.serial_number().to_bn().ok()?.to_vec();
    // DER integers are signed: a high first bit needs a leading zero.
    if serial.first().is_some_and(|b| b & 0x80 != 0) {
        serial.insert(0, 0);
    }
    let id = CertificateIdentifier::new(
        rustls_pki_types::Der::from_slice(&key_id),
        rustls_pki_types::Der::from_slice(&serial),
    );
    match account.renewal_info(&id).await {
        Ok((info, _)) => Some(Window {
            start: info.suggested_window.start.unix_timestamp(),
            end: info.suggested_window.end.unix_timestamp(),
        }),
        Err(instant_acme::Error::Unsupported(_)) => None,
        Err(error) => {
            log::warn!("ACME: renewal information unavailable ({error}); renewing at two thirds of the lifetime");
            None
        }
    }
}

/// One order for one name over HTTP-01: returns the PEM chain and key.
async fn order(account: &Account, name: &str, challenges: &SharedChallenges) -> Result<(String, String), AcmeError> {
    let identifiers = [Identifier::Dns(name.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut offered = Vec::new();
    let mut authorizations = order.authorizations();
    let mut failure = None;
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = match authorization {
            Ok(authorization) => authorization,
            Err(error) => {
                failure = Some(AcmeError::from(error));
                break;
            }
        };
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                failure = Some(AcmeError::Invalid(format!("authorization for {name} is {other:?}")));
                break;
            }
        }
        let Some(mut challenge) = authorization.challenge(ChallengeType::Http01) else {
            failure = Some(AcmeError::NoHttpChallenge(name.to_string()));
            break;
        };
        let token = challenge.token.clone();
        challenges.offer(&token, challenge.key_authorization().as_str().to_string());
        offered.push(token);
        if let Err(error) = challenge.set_ready().await {
            failure = Some(error.into());
            break;
        }
    }
    let result = match failure {
        Some(error) => Err(error),
        None => finish(&mut order).await,
    };
    for token in &offered {
        challenges.withdraw(token);
    }
    result
}

async fn finish(order: &mut instant_acme::Order) -> Result<(String, String), AcmeError> {
    let retries = RetryPolicy::new().timeout(Duration::from_secs(90));
    let status = order.poll_ready(&retries).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Invalid(challenge_errors(order).await));
    }
    let key = crate::acme::store::new_key()?;
    let name = order.identifiers().next().await.and_then(|i| i.ok()).map(|i| i.to_string()).unwrap_or_default();
    order.finalize_csr(&crate::acme::store::csr_der(&name, &key)?).await?;
    let chain = order.poll_certificate(&retries).await?;
    let key_pem = String::from_utf8_lossy(&key.private_key_to_pem_pkcs8()?).into_owned();
    Ok((chain, key_pem))
}

/// Why the CA refused: each challenge's problem, or the order's own status.
async fn challenge_errors(order: &mut instant_acme::Order) -> String {
    let mut reasons = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if let Ok(state) = authorization.refresh().await {
            for challenge in &state.challenges {
                if let Some(problem) = &challenge.error {
                    reasons.push(problem.to_string());
                }
            }
        }
    }
    if reasons.is_empty() {
        format!("the order is {:?}", order.state().status)
    } else {
        reasons.join("; ")
    }
}
