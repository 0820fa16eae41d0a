//! The ACME side under faults, against a real Pebble: a CA that answers 5xx
//! to a third of all requests, one that rejects half of all nonces, a load
//! balancer's HTML error page, a CA that forgot the account, and a clock
//! years ahead of the CA's. Each of these once cost an operator a renewal,
//! a misleading error, or a CA's rate limit.
//!
//! Like tests/acme.rs, each test has its own Pebble and host names
//! (`imap.TAG.test`), so the shared log can be searched per test.

mod common;

use std::time::Duration;

use common::acme::{tools, AriProxy, Pebble};
use common::process::Running;
use common::site::*;
use common::{log_line, log_lines, tool, Proxy};

/// Forced renewals under each storm.
const RENEWALS: usize = 8;

/// Starts a site whose CA sits behind an [`AriProxy`] (where faults are
/// injected), with `percent` % of requests answered `status` from the
/// first one on, and waits for the first certificate.
async fn site_behind_faults(
    tag: &'static str,
    percent: u8,
    status: u16,
) -> (Site, Pebble, AriProxy, Proxy, Vec<Vec<u8>>) {
    let site = Site::new(tag).await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let ari = AriProxy::start(&pebble).await;
    ari.set_faults(
        percent,
        status,
        "<html><body><h1>Internal Server Error</h1></body></html>",
    );
    let yaml = site.config(&ari.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start(&yaml).await;
    let chain = wait_issued(proxy.addr(&site.imaps()), &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("{tag}: no certificate:\n{}\n{}", pebble.log(), ari.log()));
    (site, pebble, ari, proxy, chain)
}

/// Forces [`RENEWALS`] renewals one after another; each must succeed in
/// its one attempt. Returns the serials, each new.
async fn renew_all(site: &Site, first: &[u8], logs: impl Fn() -> String) -> Vec<String> {
    let mut serials = vec![serial(first)];
    for i in 0..RENEWALS {
        let row = renew(site, true).await;
        assert_eq!(row.outcome, "renewed", "renewal {i}: {row:?}\n{}", logs());
        let new = row
            .detail
            .strip_prefix("serial ")
            .and_then(|d| d.split(',').next())
            .unwrap_or_else(|| panic!("{row:?}"))
            .to_string();
        assert!(!serials.contains(&new), "a new serial each time");
        serials.push(new);
    }
    serials
}

/// 30 % of all requests to the CA (the directory, nonces, orders, polls,
/// the certificate) get an HTTP 500 page from the load balancer in front of
/// it. Each renewal still succeeds in its one attempt (0 of 8 did before
/// requests were retried inside the attempt), and none counts as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_5xx_answers_is_ridden_out_inside_each_attempt() {
    let test = "a_storm_of_5xx_answers_is_ridden_out_inside_each_attempt";
    if !tools(test) {
        return;
    }
    let (site, pebble, ari, proxy, chain) = site_behind_faults("c5x", 30, 500).await;
    let serials = renew_all(&site, &chain[0], || {
        format!("{}\n{}", pebble.log(), ari.log())
    })
    .await;
    let served = served_chain(proxy.addr(&site.imaps()), &site.names[0])
        .await
        .unwrap();
    assert_eq!(Some(&serial(&served[0])), serials.last());
    let injected = ari.faults_injected();
    println!(
        "{test}: {} renewals, {injected} requests answered 500",
        serials.len() - 1
    );
    assert!(injected >= 10, "the storm happened: {injected} faults");
    assert!(
        log_lines(&[&site.span(), "certificate order failed"]).is_empty(),
        "no attempt failed"
    );
    assert_eq!(cert_row(&site).await.last_error, None);
}

/// Pebble rejects half of all nonces with `badNonce` (as a CA under load
/// may): instant-acme retries each POST three times, portcullis retries the
/// operation on top. 1 of 8 renewals succeeded before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_rejects_half_the_nonces_still_issues_every_time() {
    if !tools("a_ca_that_rejects_half_the_nonces_still_issues_every_time") {
        return;
    }
    let site = Site::new("cnn").await;
    let mut ports = Pebble::reserve();
    ports.nonce_reject_percent = 50;
    let pebble = ports.start(site.http, site.imaps).await;
    let yaml = site.config(&pebble.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start(&yaml).await;
    let chain = wait_issued(proxy.addr(&site.imaps()), &site.names[0], None)
        .await
        .unwrap_or_else(|| panic!("no certificate:\n{}", pebble.log()));
    renew_all(&site, &chain[0], || pebble.log()).await;
    assert!(
        log_lines(&[&site.span(), "certificate order failed"]).is_empty(),
        "no attempt failed"
    );
}

/// A load balancer in front of the CA answers every request with its own
/// HTML 502 page. The error says which request got which status and what
/// the page said, in the log, `certs` and `renew` — not "failed to
/// (de)serialize JSON: expected value at line 1 column 1". Once the CA is
/// back, `renew` succeeds and the error is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_balancer_error_page_is_reported_with_its_request_and_status() {
    if !tools("a_load_balancer_error_page_is_reported_with_its_request_and_status") {
        return;
    }
    let site = Site::new("c52").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let ari = AriProxy::start(&pebble).await;
    ari.set_faults(
        100,
        502,
        "<html><head><title>502 Bad Gateway</title></head></html>",
    );
    let yaml = site.config(&ari.directory, &pebble.ca_roots, "http-01");
    let _proxy = Proxy::start(&yaml).await;
    // Every request is tried four times, every operation four times: ~10 s.
    let first = eventually(ISSUE, || async { cert_row(&site).await.last_error }).await;
    assert!(first.is_some(), "no failure reported:\n{}", ari.log());
    let failed = log_line(&[&site.span(), "certificate order failed"]).await;
    let want = format!(
        "GET {}: HTTP 502 Bad Gateway: <html><head><title>502 Bad Gateway</title></head></html>",
        ari.directory
    );
    let row = renew(&site, true).await;
    let listed = cert_row(&site).await.last_error.unwrap_or_default();
    for (what, text) in [
        ("log", failed.as_str()),
        ("renew", row.detail.as_str()),
        ("certs", listed.as_str()),
    ] {
        assert!(text.contains(&want), "{what} says: {text}\nnot: {want}");
        assert!(!text.contains("serialize"), "{what}: {text}");
    }
    assert_eq!(row.outcome, "failed");

    ari.clear_faults();
    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", pebble.log());
    assert_eq!(cert_row(&site).await.last_error, None);
}

/// The CA forgets the account (a deactivated account; here a restarted
/// Pebble, which keeps no state). The renewal registers a new account and
/// succeeds in the same attempt: no failure, no failure email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_ca_forgot_is_registered_anew_within_the_attempt() {
    if !tools("an_account_the_ca_forgot_is_registered_anew_within_the_attempt") {
        return;
    }
    let (site, pebble, proxy, _, chain) = issued_site("caf", "http-01").await;
    let account = portcullis::acme::account::credentials_path(&site.state_dir(), &pebble.directory);
    assert!(account.exists(), "{}", account.display());
    let pebble = pebble.stop().start(site.http, site.imaps).await;
    let row = renew(&site, true).await;
    assert_eq!(row.outcome, "renewed", "{row:?}\n{}", pebble.log());
    log_line(&[
        &site.span(),
        "the CA does not know the stored ACME account; registering a new one",
    ])
    .await;
    assert_eq!(
        log_lines(&[&site.span(), "ACME account registered"]).len(),
        2,
        "registered at the first order and again now"
    );
    assert!(
        log_lines(&[&site.span(), "certificate order failed"]).is_empty(),
        "the attempt did not fail"
    );
    let served = served_chain(proxy.addr(&site.imaps()), &site.names[0])
        .await
        .unwrap();
    assert_ne!(serial(&served[0]), serial(&chain[0]));
    assert!(common::acme::chains_to(
        &pebble.root_der().await,
        &served,
        &site.names[1]
    ));
}

/// This machine's clock three years ahead of the CA's (`faketime`): every
/// 90-day certificate Pebble issues is expired by portcullis's clock the
/// moment it arrives. portcullis used to order again at once, about 115
/// times a minute; now it serves the certificate, says the clock looks
/// wrong, and orders no more for a tenth of the lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_years_ahead_gets_one_certificate_and_a_warning_not_an_order_loop() {
    let test = "a_clock_years_ahead_gets_one_certificate_and_a_warning_not_an_order_loop";
    if !tools(test) || !tool("faketime", test) {
        return;
    }
    let site = Site::new("cck").await;
    let mut ports = Pebble::reserve();
    ports.cert_validity = Some(90 * DAY);
    let pebble = ports.start(site.http, site.imaps).await;
    site.config(&pebble.directory, &pebble.ca_roots, "http-01");
    // libfaketime preloaded into portcullis itself (the `faketime` wrapper
    // would stand between the test and the process it signals).
    let ahead = [
        (
            "LD_PRELOAD",
            "/usr/$LIB/faketime/libfaketime.so.1".to_string(),
        ),
        ("FAKETIME", "+1100d".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ];
    let mut run = Running::start(&site.config_path(), &ahead);
    let issued = run
        .wait_log(&["certificate issued"], ISSUE)
        .unwrap_or_else(|e| panic!("{e}\n{}", pebble.log()));
    assert!(
        issued.starts_with("2029-") || issued.starts_with("2030-"),
        "faked: {issued}"
    );
    let skew = run
        .wait_log(
            &["already due for renewal by this machine's clock"],
            QUICK_LOG,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for field in ["now=", "not_before=", "not_after=", "no_order_before="] {
        assert!(skew.contains(field), "{field}: {skew}");
    }
    // Given time for the loop it used to run (two orders a second).
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(pebble.orders(), 1, "one order, not a loop:\n{}", run.log());
    let chain = served_chain(proxy_addr(&site), &site.names[0])
        .await
        .unwrap();
    assert!(!is_placeholder(&chain), "the new certificate is served");
    assert!(run.stop().success());
}

/// Bound on a log line that follows one already seen.
const QUICK_LOG: Duration = Duration::from_secs(10);

/// The site's IMAPS listener (a fixed port, so a subprocess's too).
fn proxy_addr(site: &Site) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], site.imaps))
}
