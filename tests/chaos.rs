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
/// Bound on the first issuance when a third of the requests fail (Pebble
/// alone takes about a second; each lost answer adds up to a few).
const UNDER_FAULTS: Duration = Duration::from_secs(90);

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
    let imaps = proxy.addr(&site.imaps());
    let chain = eventually(UNDER_FAULTS, || async {
        let chain = served_chain(imaps, &site.names[0]).await.ok()?;
        (!is_placeholder(&chain)).then_some(chain)
    })
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

/// The CA acts on a request but its answer is lost on the way back (a load
/// balancer timing out): every finalize, every challenge "ready" (its answer
/// breaks off halfway), and 30 % of all other requests. Made again blindly,
/// a lost finalize would be refused ("orderNotReady") and the certificate
/// the CA issued thrown away; a lost "ready" refused as "not pending".
/// portcullis looks at the CA's state first: every renewal succeeds at once,
/// and each costs the CA exactly one certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_after_the_ca_acted_are_not_acted_on_twice() {
    let test = "answers_lost_after_the_ca_acted_are_not_acted_on_twice";
    if !tools(test) {
        return;
    }
    let site = Site::new("clo").await;
    let pebble = Pebble::start(site.http, site.imaps).await;
    let ari = AriProxy::start(&pebble).await;
    ari.set_lost_answers(30);
    let yaml = site.config(&ari.directory, &pebble.ca_roots, "http-01");
    let proxy = Proxy::start(&yaml).await;
    let imaps = proxy.addr(&site.imaps());
    let chain = eventually(UNDER_FAULTS, || async {
        let chain = served_chain(imaps, &site.names[0]).await.ok()?;
        (!is_placeholder(&chain)).then_some(chain)
    })
    .await
    .unwrap_or_else(|| panic!("no certificate:\n{}\n{}", pebble.log(), ari.log()));
    renew_all(&site, &chain[0], || {
        format!("{}\n{}", pebble.log(), ari.log())
    })
    .await;
    let lost = ari.faults_injected();
    println!("{test}: {lost} answers lost");
    assert!(
        lost >= 2 * (1 + RENEWALS),
        "every finalize and ready answer lost: {lost}"
    );
    assert_eq!(pebble.issued(), 1 + RENEWALS, "one certificate per renewal");
    assert!(
        log_lines(&[&site.span(), "certificate order failed"]).is_empty(),
        "no attempt failed"
    );
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
    // "Come back in an hour": not waited for inside the attempt.
    let page = "<html><head><title>502 Bad Gateway</title></head></html>";
    ari.set_outage(502, page, 3600);
    let yaml = site.config(&ari.directory, &pebble.ca_roots, "http-01");
    let _proxy = Proxy::start(&yaml).await;
    let failed = log_line(&[&site.span(), "certificate order failed"]).await;
    assert!(
        failed.contains("retry_in=1h"),
        "the CA's Retry-After: {failed}"
    );
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

    // Restarts (a deploy, a crash) order no more either: the stored
    // certificate, expired by this clock, is served until the floor.
    let mut run = Running::start(&site.config_path(), &ahead);
    run.wait_log(
        &["has expired by this machine's clock: serving it"],
        QUICK_LOG,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The next renewal is the floor after the stored issuance: nine days
    // (a tenth of 90) by this clock, not "now".
    let meta = std::fs::read_to_string(site.host_dir().join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let issued_at = humantime::parse_rfc3339(meta["issued_at"].as_str().unwrap()).unwrap();
    let row = cert_row(&site).await;
    let next = row.next_renewal.as_deref().expect("a next renewal");
    let next = humantime::parse_rfc3339(next).unwrap();
    let floor = 9 * DAY - Duration::from_secs(60); // to the second, of a lifetime a bit under 90 days
    assert!(next >= issued_at + floor, "{row:?}, issued at {meta}");
    assert_eq!(pebble.orders(), 1, "no order at restart:\n{}", run.log());
    let again = served_chain(proxy_addr(&site), &site.names[0])
        .await
        .unwrap();
    assert_eq!(
        serial(&again[0]),
        serial(&chain[0]),
        "the stored certificate"
    );
    assert!(run.stop().success());

    // The operator fixes the clock. The issuance time stored by the wrong
    // clock (three years ahead) must not hold renewals back until then:
    // renewed when a third of its 90 days is left, as usual.
    let proxy = Proxy::start(&std::fs::read_to_string(site.config_path()).unwrap()).await;
    let row = cert_row(&site).await;
    let next = row.next_renewal.as_deref().expect("a next renewal");
    let next = humantime::parse_rfc3339(next).unwrap();
    assert!(next < now_secs() + 61 * DAY, "{row:?}");
    proxy.shutdown().await;
}

/// Bound on a log line that follows one already seen.
const QUICK_LOG: Duration = Duration::from_secs(10);

/// The site's IMAPS listener (a fixed port, so a subprocess's too).
fn proxy_addr(site: &Site) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], site.imaps))
}

// --- a state_dir that cannot be written ---

/// Runs `portcullis run` in a mount namespace of its own, after `script`
/// (sh, with `$STATE` the site's state_dir) has changed its view of the
/// state_dir: what the test sees, and what stays on disk, is untouched.
fn in_mount_namespace(script: &'static str) -> Vec<&'static str> {
    let unshare = "unshare --mount --propagation private sh -c";
    let mut words: Vec<&str> = unshare.split(' ').collect();
    words.extend([script, "sh"]);
    words
}

/// The state_dir on a read-only mount (`mount -o remount,ro`).
const READ_ONLY: &str = r#"set -e
mount --bind "$STATE" "$STATE"
mount -o remount,bind,ro "$STATE"
exec "$@""#;

/// The state_dir's files copied (from `$COPY`) onto a tmpfs of 256 KiB,
/// then filled to the last block.
const FULL_DISK: &str = r#"set -e
mount -t tmpfs -o size=256k,mode=0700 portcullis-test "$STATE"
cp -a "$COPY/." "$STATE/"
dd if=/dev/zero of="$STATE/.filler" bs=4k 2>/dev/null || true
exec "$@""#;

/// Whether this machine lets a test make mount namespaces (root, or
/// CAP_SYS_ADMIN): missing, the test skips loudly (or fails under
/// PORTCULLIS_REQUIRE_TOOLS=1).
fn mount_namespaces(test: &str) -> bool {
    if !tool("unshare", test) {
        return false;
    }
    let ok = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let msg = format!("SKIPPED {test}: cannot make a mount namespace (needs root)");
        assert!(
            std::env::var("PORTCULLIS_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{msg}, and PORTCULLIS_REQUIRE_TOOLS=1 forbids skipping"
        );
        common::say_skipped(&msg);
    }
    ok
}

/// The stored pair's bytes: `fullchain.pem`, `privkey.pem`.
fn stored_files(host_dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let read = |name: &str| std::fs::read(host_dir.join(name)).unwrap();
    (read("fullchain.pem"), read("privkey.pem"))
}

/// Asks the CA (through the ARI proxy) to have the certificate renewed now,
/// and waits for the renewal and its store error; returns the new serial
/// and the error line.
fn renewal_that_cannot_be_stored(run: &mut Running, ari: &AriProxy) -> (String, String) {
    let now = now_secs();
    ari.set_window(now, now + Duration::from_secs(2), 1);
    let issued = run
        .wait_log(&["certificate issued"], ISSUE)
        .unwrap_or_else(|e| panic!("{e}\n{}", ari.log()));
    ari.set_window(now + 365 * DAY, now + 366 * DAY, 3600);
    let error = run
        .wait_log(&["the new certificate could not be stored"], QUICK_LOG)
        .unwrap_or_else(|e| panic!("{e}"));
    let serial = issued
        .split("serial=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{issued}"))
        .to_string();
    (serial, error)
}

/// A state_dir on a read-only file system (a mistake in a container's
/// mounts, a remount after disk errors). portcullis used to refuse to
/// start ("cannot start error=state_dir …: Read-only file system") although
/// a valid pair was stored. Now it serves the stored pair, says what it
/// cannot do, serves a renewal it cannot store and leaves the disk as it
/// was. Once the file system is writable again (and a reload, or a minute,
/// has passed), the renewal is stored and the control socket answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_dir_serves_what_is_stored() {
    let test = "a_read_only_state_dir_serves_what_is_stored";
    if !tools(test) || !mount_namespaces(test) || !tool("nsenter", test) {
        return;
    }
    let (site, _pebble, ari, proxy, chain) = site_behind_faults("cro", 0, 500).await;
    proxy.shutdown().await;
    site.age_stored_certificate(2 * HOUR);
    let old = serial(&chain[0]);
    let before = stored_files(&site.host_dir());

    let state = site.state_dir().to_str().unwrap().to_string();
    let mut run = Running::start_under(
        &in_mount_namespace(READ_ONLY),
        &site.config_path(),
        &[("STATE", state.clone())],
    );
    let warned = run
        .wait_log(&["state_dir is not writable"], QUICK_LOG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(warned.contains("Read-only file system"), "{warned}");
    assert!(warned.contains(" WARN "), "{warned}");
    for line in [
        "no control socket",
        "serving the stored ACME certificate",
        "listening",
    ] {
        run.wait_log(&[line], QUICK_LOG)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let served = served_chain(proxy_addr(&site), &site.names[0])
        .await
        .unwrap();
    assert_eq!(serial(&served[0]), old, "the stored pair is served");

    let (new, error) = renewal_that_cannot_be_stored(&mut run, &ari);
    assert!(error.contains("Read-only file system"), "{error}");
    let served = served_chain(proxy_addr(&site), &site.names[1])
        .await
        .unwrap();
    assert_eq!(serial(&served[0]), new, "the renewal is served anyway");
    assert!(!run.log().contains("cannot start"), "{}", run.log());
    assert_eq!(
        stored_files(&site.host_dir()),
        before,
        "the disk is as it was"
    );

    // The operator fixes the mount, then reloads.
    let pid = run.pid().to_string();
    let remount = [
        "--target",
        &pid,
        "--mount",
        "mount",
        "-o",
        "remount,bind,rw",
        &state,
    ];
    let fixed = std::process::Command::new("nsenter")
        .args(remount)
        .status()
        .unwrap();
    assert!(fixed.success());
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
    for line in [
        "state_dir is writable again",
        "control socket ready",
        "the certificate that could not be stored is stored now",
    ] {
        run.wait_log(&[line], QUICK_LOG)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(serial(&stored_chain(&site)[0]), new, "stored now");
    assert_eq!(
        cert_row(&site).await.serial,
        new,
        "portcullis certs answers"
    );
    assert!(run.stop().success(), "{}", run.log());
}

/// A state_dir whose file system is full when a renewal comes. The new
/// certificate is served, the error says "No space left on device", and
/// what is on disk is the old pair, whole: no half-written key, no stray
/// temporary file or version directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_stored_pair_whole_and_serves_the_renewal() {
    let test = "a_full_disk_keeps_the_stored_pair_whole_and_serves_the_renewal";
    if !tools(test) || !mount_namespaces(test) {
        return;
    }
    let (site, _pebble, ari, proxy, chain) = site_behind_faults("cfd", 0, 500).await;
    proxy.shutdown().await;
    site.age_stored_certificate(2 * HOUR);
    let old = serial(&chain[0]);
    let before = stored_files(&site.host_dir());
    let copy = common::scratch();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", site.state_dir().display()))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(copied.success());

    let state = site.state_dir().to_str().unwrap().to_string();
    let from = copy.path().to_str().unwrap().to_string();
    let mut run = Running::start_under(
        &in_mount_namespace(FULL_DISK),
        &site.config_path(),
        &[("STATE", state), ("COPY", from)],
    );
    let warned = run
        .wait_log(&["state_dir is not writable"], QUICK_LOG)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(warned.contains("No space left on device"), "{warned}");
    run.wait_log(&["serving the stored ACME certificate"], QUICK_LOG)
        .unwrap_or_else(|e| panic!("{e}"));

    let (new, error) = renewal_that_cannot_be_stored(&mut run, &ari);
    assert!(error.contains("No space left on device"), "{error}");
    let served = served_chain(proxy_addr(&site), &site.names[0])
        .await
        .unwrap();
    assert_eq!(serial(&served[0]), new);

    // What portcullis sees on its (full) state_dir, through its own root.
    let inside = std::path::PathBuf::from(format!("/proc/{}/root", run.pid()))
        .join(site.host_dir().strip_prefix("/").unwrap());
    assert_eq!(stored_files(&inside), before, "the old pair, whole");
    let certs = inside.parent().unwrap();
    let mut entries: Vec<String> = std::fs::read_dir(certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let mut want = vec![site.names[0].clone(), format!(".{}.{old}", site.names[0])];
    want.sort();
    assert_eq!(entries, want, "no half-written version or temporary file");
    assert!(run.stop().success(), "{}", run.log());
}
