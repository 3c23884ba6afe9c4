//! After admission: what already runs is judged, and what was changed in place is replaced.
//!
//! - [`inventory`] lists every Pod and pod-template workload, folding pods into their owners;
//! - [`results`] judges them with the webhook's own evaluator and signature checker (so the
//!   scan fills the cache admission reads, and never holds anything admission waits on), and
//!   finds [`drift`] and tainted pods;
//! - [`report`] writes OpenReports (or PolicyReports), bounded in objects, results and bytes;
//!   [`status`] writes each policy's counts;
//! - [`taint`] marks pods entered through an admitted exec or attach and evicts them once a
//!   policy's grace period has passed.
//!
//! One replica at a time scans and evicts, holding a Lease; every replica marks the pods its
//! own webhook let someone into. A scan runs at start, after every change of the policies in
//! force or of a namespace's labels, after a tainted pod changes state, and on an interval.
//! When the API server goes away a scan fails, is retried with backoff, and the reports and
//! statuses already written stay as they are.
//!
//! Nothing on the request path depends on this module: the webhook hands admitted entries to
//! a bounded queue (`audit::entered`) and moves on.
//!
//! The scan runs on a thread and runtime of its own (`fixity-scan`), with a Kubernetes client
//! made there, so the runtime that serves reviews never decodes a page of pods or evaluates a
//! scan: on a node with two cores, those slices used to hold one of its two workers long enough
//! to quadruple admission's p99. What it shares with the webhook is the same objects (policy
//! store, signature checker and cache, registry bounds, metrics); signature checks that reach
//! a registry are run on the webhook's runtime (`results::Judge::checks_on`), whose connections
//! they use, and the Lease and the taint marks stay there too.
//!
//! The scan's thread also runs at a lower CPU priority (nice 10, set on the thread
//! as it starts; Linux keeps a nice value per thread): on a busy node the webhook's workers got
//! a core later while the scan thread and the API server answering its lists held both, and
//! a lower priority hands them the core first. When the cores are idle the scan is as fast.

pub mod drift;
pub mod inventory;
pub mod report;
pub mod results;
pub mod status;
pub mod taint;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::Guard;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::audit::metrics::{ResultLabels, ScanResultLabels};
use crate::audit::{Entered, EventSink, Metrics};
use crate::lease::LeaseLock;
use crate::policy::{CompiledPolicy, Mode, PolicyStore};
use crate::verify::checker::SignatureChecker;
use crate::verify::credentials::pull_secrets::PullSecrets;
use report::{ReportError, Stamp, Writer};
use results::{Judge, RegistryLimits, Verdict};
use taint::{Replacements, Replacer};

/// How long the scan Lease lasts unless renewed; renewed every third of it.
const LEASE: Duration = Duration::from_secs(15);
/// Changes arriving together are scanned together: a scan starts this long after the first.
const DEBOUNCE: Duration = Duration::from_secs(1);
/// How often the Lease holder looks at tainted pods.
const REPLACE_EVERY: Duration = Duration::from_secs(5);
/// Retry delays after a failed scan.
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How the scanner runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between scans when nothing triggers one sooner.
    pub interval: Duration,
    /// The Lease, in `namespace`, and this replica's name in it.
    pub lease: String,
    pub namespace: String,
    pub identity: String,
    pub registry: RegistryLimits,
    /// Objects per list request.
    pub page: u32,
    /// `None`: no reports, policy statuses only.
    pub reports: Option<report::Format>,
    pub report_limits: report::Limits,
}

/// Why a scan did not complete.
#[derive(Debug, thiserror::Error)]
enum ScanError {
    #[error(transparent)]
    List(#[from] inventory::ListError),
    #[error("writing reports: {0}")]
    Report(kube::Error),
    #[error("writing the status of policy {policy}: {source}")]
    Status { policy: String, source: kube::Error },
    #[error("the scan Lease was lost during the scan; its results were not written")]
    LostLease,
}

/// Why the scanner did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the scan runtime: {0}")]
    Runtime(std::io::Error),
    #[error("connecting the scan to the Kubernetes API: {0}")]
    Client(kube::Error),
}

/// The background scanner and the taint controller.
pub struct Scanner {
    client: Client,
    evictions: Client,
    config: kube::Config,
    store: Arc<PolicyStore>,
    checker: Arc<SignatureChecker>,
    registry_credentials: bool,
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
    settings: Settings,
}

/// The running scanner; [`Running::stop`] gives the Lease back.
pub struct Running {
    lock: Arc<LeaseLock>,
    leading: watch::Receiver<bool>,
    tasks: Vec<JoinHandle<()>>,
    scan: ScanThread,
}

/// The scan's thread: told to stop through `stop`, says it has through `stopped`.
struct ScanThread {
    stop: oneshot::Sender<()>,
    stopped: oneshot::Receiver<()>,
}

impl Running {
    /// Stops every task and the scan's thread, then releases the Lease if this replica holds
    /// it, so another replica need not wait for it to expire.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.scan.stop.send(());
        // Sent as the thread ends; an error means it already has.
        let _ = self.scan.stopped.await;
        if *self.leading.borrow()
            && let Err(e) = self.lock.release().await
        {
            tracing::warn!(error = %e, "could not release the scan lease; it will expire");
        }
    }
}

impl Scanner {
    /// `evictions` must not retry refused requests (429) itself: a refused eviction is
    /// retried on the replacer's schedule and reported as held back meanwhile. The scan's own
    /// client is made from `config` on the scan's runtime.
    pub fn new(
        client: Client,
        evictions: Client,
        config: kube::Config,
        store: Arc<PolicyStore>,
        checker: Arc<SignatureChecker>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self {
            client,
            evictions,
            config,
            store,
            checker,
            registry_credentials: false,
            events: None,
            metrics,
            settings,
        }
    }

    /// Reads registry credentials as the webhook does (pull secrets, policies' Secrets).
    pub fn with_registry_credentials(mut self) -> Self {
        self.registry_credentials = true;
        self
    }

    /// Records Events on tainted and evicted pods.
    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = Some(events);
        self
    }

    /// Starts marking the pods in `entered`, and scanning and replacing whenever this replica
    /// holds the Lease. Called on the webhook's runtime, where everything but the scan runs.
    pub fn start(self, entered: mpsc::Receiver<Entered>) -> Result<Running, StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        // Made inside the scan's runtime, which then drives its connections.
        let scan_client = {
            let _inside = runtime.enter();
            Client::try_from(self.config.clone()).map_err(StartError::Client)?
        };
        let lock = Arc::new(LeaseLock::new(
            kube::Api::namespaced(self.client.clone(), &self.settings.namespace),
            self.settings.lease.clone(),
            self.settings.identity.clone(),
            LEASE,
        ));
        let (leading_tx, leading) = watch::channel(false);
        let triggered = Arc::new(Notify::new());
        let replacer = Arc::new(Replacer::new(
            self.evictions.clone(),
            self.events.clone(),
            self.metrics.clone(),
        ));
        let mut tasks = vec![
            tokio::spawn(taint::mark_entered(
                self.client.clone(),
                self.events.clone(),
                self.metrics.clone(),
                entered,
                triggered.clone(),
            )),
            tokio::spawn(hold_lease(lock.clone(), leading_tx)),
        ];
        tasks.push(tokio::spawn(replace_loop(
            replacer.clone(),
            self.store.clone(),
            leading.clone(),
            triggered.clone(),
        )));
        let scan = Scan {
            pull_secrets: self
                .registry_credentials
                .then(|| PullSecrets::new(scan_client.clone())),
            client: scan_client,
            store: self.store,
            checker: self.checker,
            webhook: Handle::current(),
            metrics: self.metrics,
            settings: self.settings,
        };
        let states = replacer.states.clone();
        let looping = scan.scan_loop(leading.clone(), triggered, states, replacer);
        let thread = spawn_scan_thread(runtime, looping).map_err(StartError::Runtime)?;
        Ok(Running {
            lock,
            leading,
            tasks,
            scan: thread,
        })
    }
}

/// Runs `looping` on its own thread and runtime until told to stop.
fn spawn_scan_thread(
    runtime: Runtime,
    looping: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<ScanThread> {
    let (stop, stop_asked) = oneshot::channel();
    let (done, stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name("fixity-scan".to_owned())
        .spawn(move || {
            lower_priority();
            runtime.block_on(async {
                tokio::select! {
                    () = looping => {}
                    _ = stop_asked => {}
                }
            });
            // Its tasks and connections end with it, before the webhook hears it has stopped.
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(ScanThread { stop, stopped })
}

/// The nice value of the scan's thread: when the cores are busy, the webhook's workers (nice 0)
/// get about nine tenths of a core for every tenth the scan gets; when they are idle the scan
/// runs at full speed.
const SCAN_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`SCAN_NICE`] (never raises it: a fixity started
/// at a lower priority keeps it). Linux keeps a nice value per thread, so the webhook's threads
/// keep theirs. A failure costs admission some latency during a scan, nothing else: it is
/// logged and the scan runs anyway.
fn lower_priority() {
    let thread = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(thread).and_then(|now| {
        if now >= SCAN_NICE {
            return Ok(now);
        }
        rustix::process::setpriority_process(thread, SCAN_NICE).map(|()| SCAN_NICE)
    });
    match lowered {
        Ok(nice) => tracing::debug!(nice, "the scan thread runs at a lower CPU priority"),
        Err(e) => tracing::warn!(
            error = %e,
            "could not lower the scan thread's CPU priority; it competes with admission as an equal"
        ),
    }
}

/// What the scan's thread runs with: its own client, and the webhook's shared objects.
struct Scan {
    client: Client,
    store: Arc<PolicyStore>,
    checker: Arc<SignatureChecker>,
    pull_secrets: Option<PullSecrets>,
    /// Where signature checks that reach a registry run.
    webhook: Handle,
    metrics: Arc<Metrics>,
    settings: Settings,
}

impl Scan {
    async fn scan_loop(
        self,
        mut leading: watch::Receiver<bool>,
        triggered: Arc<Notify>,
        states: Arc<Replacements>,
        replacer: Arc<Replacer>,
    ) {
        let mut changes = self.store.subscribe();
        let mut writer = self
            .settings
            .reports
            .map(|format| Writer::new(self.client.clone(), format, self.settings.report_limits));
        let mut due = tokio::time::Instant::now();
        let mut backoff = BACKOFF_FIRST;
        let mut missing_reports_said = false;
        loop {
            if !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
                if *leading.borrow() {
                    // A new term: what another holder wrote meanwhile is unknown.
                    if let Some(w) = writer.as_mut() {
                        w.reset();
                    }
                    replacer.reset();
                    due = tokio::time::Instant::now();
                }
                continue;
            }
            if !self.store.is_ready() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let debounce = tokio::select! {
                () = tokio::time::sleep_until(due) => false,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                () = triggered.notified() => true,
                _ = leading.changed() => continue,
            };
            if debounce {
                tokio::time::sleep(DEBOUNCE).await;
                changes.borrow_and_update();
            }
            match self
                .scan(
                    &leading,
                    writer.as_mut(),
                    &states,
                    &mut missing_reports_said,
                )
                .await
            {
                Ok(()) => {
                    backoff = BACKOFF_FIRST;
                    due = tokio::time::Instant::now() + self.settings.interval;
                }
                Err(e) => {
                    self.metrics
                        .scans
                        .get_or_create(&ResultLabels { result: "error" })
                        .inc();
                    tracing::warn!(
                        error = %e,
                        retry_secs = backoff.as_secs(),
                        "scan failed; the reports already written stay; retrying"
                    );
                    due = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn scan(
        &self,
        leading: &watch::Receiver<bool>,
        writer: Option<&mut Writer>,
        states: &Replacements,
        missing_reports_said: &mut bool,
    ) -> Result<(), ScanError> {
        let started = Instant::now();
        self.metrics.scan_running.set(1);
        let _running = ScanRunning(&self.metrics);
        tracing::info!("scan started");
        let inventory = inventory::collect(&self.client, None, self.settings.page).await?;
        let policies: Arc<Vec<CompiledPolicy>> = Guard::into_inner(self.store.policies());
        let store = &self.store;
        let labels = |ns: &str| store.namespace_labels(ns);
        let judge = Judge {
            policies: &policies,
            labels: &labels,
            checker: Some(&self.checker),
            checks_on: Some(&self.webhook),
            pull_secrets: self.pull_secrets.as_ref(),
            limits: self.settings.registry,
            replacements: Some(states),
        };
        let (findings, checks) = judge.run(&inventory).await;
        if !*leading.borrow() {
            return Err(ScanError::LostLease);
        }
        let finished = Timestamp::now();
        let modes: Vec<(String, Mode)> =
            policies.iter().map(|p| (p.name.clone(), p.mode)).collect();
        let written = match writer {
            Some(writer) => {
                let now = Stamp {
                    seconds: finished.as_second(),
                    nanos: 0,
                };
                match writer.write(&findings, &modes, now).await {
                    Ok(w) => Some(w),
                    Err(ReportError::NotInstalled(what)) => {
                        if !*missing_reports_said {
                            tracing::warn!(
                                "reports not written: the {what} CustomResourceDefinition is not installed; policy statuses still carry the counts"
                            );
                            *missing_reports_said = true;
                        }
                        None
                    }
                    Err(ReportError::Api(e)) => return Err(ScanError::Report(e)),
                }
            }
            None => None,
        };
        for policy in policies.iter() {
            let status = status::of(&policy.name, &findings, finished);
            status::write(&self.client, &policy.name, &status)
                .await
                .map_err(|source| ScanError::Status {
                    policy: policy.name.clone(),
                    source,
                })?;
            for (verdict, count) in [
                (Verdict::Pass, status.results.pass),
                (Verdict::Fail, status.results.fail),
                (Verdict::Warn, status.results.warn),
            ] {
                self.metrics
                    .scan_results
                    .get_or_create(&ScanResultLabels {
                        policy: policy.name.clone(),
                        result: verdict.as_str(),
                    })
                    .set(count);
            }
        }
        let elapsed = started.elapsed();
        self.metrics
            .scans
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        self.metrics.scan_duration.observe(elapsed.as_secs_f64());
        let count = |v: Verdict| findings.iter().filter(|f| f.verdict == v).count();
        let written = written.unwrap_or_default();
        tracing::info!(
            duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            objects = inventory.objects,
            pages = inventory.pages,
            workloads = inventory.workloads.len(),
            results = findings.len(),
            fail = count(Verdict::Fail),
            warn = count(Verdict::Warn),
            pass = count(Verdict::Pass),
            signature_checks = checks.distinct,
            signature_checks_cached = checks.cached,
            report_objects = written.objects,
            report_bytes = written.bytes,
            reports_updated = written.updated,
            reports_deleted = written.deleted,
            "scan finished"
        );
        Ok(())
    }
}

/// Clears `fixity_scan_running` however the scan ends.
struct ScanRunning<'a>(&'a Metrics);

impl Drop for ScanRunning<'_> {
    fn drop(&mut self) {
        self.0.scan_running.set(0);
    }
}

/// Takes and renews the Lease; `leading` says whether this replica holds it. A renewal that
/// fails (the API server is away) counts as not holding it: another replica may take over.
async fn hold_lease(lock: Arc<LeaseLock>, leading: watch::Sender<bool>) {
    loop {
        let held = match lock.try_acquire().await {
            Ok(held) => held,
            Err(e) => {
                tracing::debug!(error = %e, "scan lease not renewed");
                false
            }
        };
        if *leading.borrow() != held {
            tracing::info!(
                held,
                "scan lease {}",
                if held { "acquired" } else { "lost" }
            );
            leading.send_replace(held);
        }
        tokio::time::sleep(LEASE / 3).await;
    }
}

/// Evicts tainted pods that are due, while this replica holds the Lease.
async fn replace_loop(
    replacer: Arc<Replacer>,
    store: Arc<PolicyStore>,
    mut leading: watch::Receiver<bool>,
    triggered: Arc<Notify>,
) {
    loop {
        if !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
            continue;
        }
        if store.is_ready() {
            let policies: Arc<Vec<CompiledPolicy>> = Guard::into_inner(store.policies());
            let labels = |ns: &str| store.namespace_labels(ns);
            match replacer.pass(&policies, labels).await {
                Ok(true) => triggered.notify_one(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not list tainted pods; retrying"),
            }
        }
        tokio::time::sleep(REPLACE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_scan_thread_runs_at_a_lower_priority_and_the_caller_keeps_its_own() {
        let thread = Some(rustix::thread::gettid());
        let before = rustix::process::getpriority_process(thread).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tell, told) = oneshot::channel();
        let scan = spawn_scan_thread(runtime, async move {
            let _ = tell.send(rustix::process::getpriority_process(Some(
                rustix::thread::gettid(),
            )));
        })
        .unwrap();
        let nice = told.await.unwrap().unwrap();
        assert_eq!(nice, before.max(SCAN_NICE));
        assert_eq!(
            rustix::process::getpriority_process(thread).unwrap(),
            before,
            "only the scan's thread is lowered"
        );
        let _ = scan.stop.send(());
        scan.stopped.await.unwrap();
    }
}
