//! A JWKS fetched over HTTP(S) and refreshed in the background.
//!
//! - Scheduled refreshes run every `jwks_refresh` from the background
//!   service; a request never waits on one.
//! - A token naming an unknown `kid` may trigger a refetch (an identity
//!   provider that rotated its keys): at most one per
//!   [`MIN_REFETCH_INTERVAL`], with one fetch in flight that every such
//!   request waits on, for at most [`FETCH_TIMEOUT`].
//! - A failed or malformed fetch keeps the last good set, and is logged
//!   once when it starts failing and once when it recovers.
//!
//! The state is drawn from a pool by provider name and URL, so a reload
//! keeps the fetched keys instead of starting without any.

use super::keys::{parse_jwks, KeySet, MAX_JWKS_BYTES};
use crate::state::StatePool;
use async_trait::async_trait;
use once_cell::sync::Lazy;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Fewest seconds between two fetches not on schedule: a stream of tokens
/// with made-up `kid`s cannot turn into a stream of fetches.
pub const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// A whole fetch, connect to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// What makes two providers' remote key sets the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSettings {
    pub url: String,
    pub refresh: Duration,
}

/// A provider's keys from `jwks_url`.
pub struct RemoteKeys {
    pub settings: RemoteSettings,
    provider: String,
    keys: arc_swap::ArcSwap<KeySet>,
    /// Bumped whenever a fetched set drops or changes a key: cached tokens
    /// verified before are not trusted again.
    generation: AtomicU64,
    state: Mutex<FetchState>,
    /// Counts finished fetches, for requests waiting on one.
    finished: watch::Sender<u64>,
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    last_attempt: Option<Instant>,
    last_success: Option<Instant>,
    /// The last fetch for an unknown `kid`, which the interval limits.
    last_refetch: Option<Instant>,
    failing: bool,
}

impl RemoteKeys {
    pub fn new(provider: &str, settings: RemoteSettings) -> Self {
        RemoteKeys {
            settings,
            provider: provider.to_owned(),
            keys: arc_swap::ArcSwap::from_pointee(KeySet::default()),
            generation: AtomicU64::new(0),
            state: Mutex::new(FetchState::default()),
            finished: watch::Sender::new(0),
        }
    }

    /// The last good key set (empty before the first fetch succeeds).
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a scheduled fetch is due: at once at first, every
    /// `refresh` after a success, and while failing every `refresh` or
    /// [`MIN_REFETCH_INTERVAL`], whichever is sooner. Marks the fetch
    /// started if so.
    pub fn claim_scheduled(&self, now: Instant) -> bool {
        let mut state = self.lock();
        if state.in_flight {
            return false;
        }
        let due = match (state.last_attempt, state.last_success) {
            (None, _) => true,
            (Some(attempt), Some(success)) if success >= attempt => {
                now.duration_since(success) >= self.settings.refresh
            }
            (Some(attempt), _) => {
                now.duration_since(attempt) >= self.settings.refresh.min(MIN_REFETCH_INTERVAL)
            }
        };
        if due {
            state.in_flight = true;
            state.last_attempt = Some(now);
        }
        due
    }

    /// For a token whose `kid` is unknown: waits for a fetch, starting one
    /// unless another unknown `kid` started one within
    /// [`MIN_REFETCH_INTERVAL`]. True if a fetch finished meanwhile (the
    /// keys may now hold the `kid`).
    pub async fn refetch_for_unknown_kid(self: &Arc<Self>) -> bool {
        let mut finished = self.finished.subscribe();
        {
            let mut state = self.lock();
            if !state.in_flight {
                let now = Instant::now();
                if state
                    .last_refetch
                    .is_some_and(|t| now.duration_since(t) < MIN_REFETCH_INTERVAL)
                {
                    return false;
                }
                state.in_flight = true;
                state.last_attempt = Some(now);
                state.last_refetch = Some(now);
                self.spawn_fetch();
            }
        }
        // The fetch has its own timeout; this one only guards against a
        // fetch task that never reports.
        matches!(
            tokio::time::timeout(
                FETCH_TIMEOUT + Duration::from_millis(500),
                finished.changed()
            )
            .await,
            Ok(Ok(()))
        )
    }

    /// Runs a claimed fetch ([`Self::claim_scheduled`], or the claim of
    /// [`Self::refetch_for_unknown_kid`]) in a task of its own.
    fn spawn_fetch(self: &Arc<Self>) {
        let url = self.settings.url.clone();
        tokio::spawn(Arc::clone(self).run_claimed(async move { download(&url).await }));
    }

    /// Runs `work`, a claimed fetch, and installs what it gives. A panic
    /// inside it (a bug here or in a dependency, on some document) counts
    /// as a failed fetch: it is logged, the claim is released and the last
    /// good keys stay, so the next refresh runs as usual instead of the
    /// provider waiting forever on a fetch that died.
    async fn run_claimed<F>(self: Arc<Self>, work: F)
    where
        F: std::future::Future<Output = Result<KeySet, String>> + Send + 'static,
    {
        let result = match tokio::spawn(work).await {
            Ok(result) => result,
            Err(e) => {
                let why = if e.is_panic() {
                    format!("the fetch panicked: {}", panic_message(e.into_panic()))
                } else {
                    "the fetch was cancelled".to_owned()
                };
                log::error!(
                    "JWKS for provider {:?} from {}: {why}; the next refresh runs as scheduled",
                    self.provider,
                    self.settings.url
                );
                Err(why)
            }
        };
        self.install(result);
    }

    /// Ends a fetch: installs a good set, or keeps the last one.
    fn install(&self, result: Result<KeySet, String>) {
        let mut state = self.lock();
        state.in_flight = false;
        match result {
            Ok(set) => {
                let lost = self.keys.load().lost_keys_in(&set);
                let count = set.len();
                // The keys first, then the generation: a request that reads
                // the new generation then finds the new keys, so nothing is
                // remembered under it that a dropped key verified. (A
                // request that read the old one and verified with a new key
                // only costs a verification once more.)
                self.keys.store(Arc::new(set));
                if lost {
                    self.generation.fetch_add(1, Ordering::AcqRel);
                }
                state.last_success = Some(Instant::now());
                if state.failing {
                    log::warn!(
                        "JWKS for provider {:?} fetched again from {} ({count} keys)",
                        self.provider,
                        self.settings.url
                    );
                } else {
                    log::info!(
                        "JWKS for provider {:?} fetched from {} ({count} keys)",
                        self.provider,
                        self.settings.url
                    );
                }
                state.failing = false;
            }
            Err(e) => {
                // Once per incident, not once per retry.
                if !state.failing {
                    log::error!(
                        "JWKS for provider {:?} from {}: {e}; keeping the last good keys ({})",
                        self.provider,
                        self.settings.url,
                        self.keys.load().len()
                    );
                }
                state.failing = true;
            }
        }
        drop(state);
        self.finished.send_modify(|n| *n += 1);
    }

    /// The set and its fetches, for the admin listener.
    pub fn status(&self) -> serde_json::Value {
        let state = self.lock();
        serde_json::json!({
            "url": self.settings.url,
            "keys": self.keys.load().len(),
            "fetched": state.last_success.is_some(),
            "failing": state.failing,
            "seconds_since_fetch": state.last_success.map(|t| t.elapsed().as_secs()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The background task that runs every due scheduled fetch of the running
/// snapshot's providers: the pool holds exactly those.
pub struct RefreshService {
    remotes: Arc<StatePool<RemoteSettings, RemoteKeys>>,
}

impl RefreshService {
    pub fn new(remotes: Arc<StatePool<RemoteSettings, RemoteKeys>>) -> Self {
        RefreshService { remotes }
    }
}

#[async_trait]
impl BackgroundService for RefreshService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // The schedule runs in a task of its own, restarted if it ever
        // panics: a dead scheduler would leave every provider with the
        // keys it had, refreshed never again, and nothing saying so.
        loop {
            let schedule = tokio::spawn(schedule(Arc::clone(&self.remotes), shutdown.clone()));
            match schedule.await {
                Ok(()) => return,
                Err(e) if e.is_panic() => log::error!(
                    "the JWKS refresh job panicked: {}; restarting it",
                    panic_message(e.into_panic())
                ),
                Err(_) => log::error!("the JWKS refresh job was cancelled; restarting it"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Starts every due scheduled fetch, once a second, until shutdown.
async fn schedule(
    remotes: Arc<StatePool<RemoteSettings, RemoteKeys>>,
    mut shutdown: ShutdownWatch,
) {
    loop {
        let now = Instant::now();
        for remote in remotes.active() {
            if remote.claim_scheduled(now) {
                remote.spawn_fetch();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |text| (*text).to_owned()),
    }
}

/// Fetches and reads a JWKS document: its keys, each `kid` once.
async fn download(url: &str) -> Result<KeySet, String> {
    let body = get(url).await?;
    let jwks = parse_jwks(&body)?;
    for skipped in &jwks.skipped {
        log::debug!("JWKS {url}: skipped {skipped}");
    }
    let mut set = KeySet::default();
    for key in jwks.keys {
        let kid = key.kid.clone();
        if !set.add(key) {
            return Err(format!("kid {kid:?} appears twice"));
        }
    }
    Ok(set)
}

/// One HTTP client for every fetch. Connections are not kept: fetches are
/// minutes apart.
static CLIENT: Lazy<Result<reqwest::Client, String>> = Lazy::new(|| {
    reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
});

/// The body of a 200 answer to GET `url`, at most [`MAX_JWKS_BYTES`].
async fn get(url: &str) -> Result<Vec<u8>, String> {
    let client = CLIENT.as_ref().map_err(Clone::clone)?;
    let mut response = client
        .get(url)
        .header("Accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the body failed: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the document is larger than {MAX_JWKS_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> RemoteKeys {
        RemoteKeys::new(
            "main",
            RemoteSettings {
                url: "http://127.0.0.1:9/jwks".into(),
                refresh: Duration::from_secs(600),
            },
        )
    }

    fn set_with(secret: &[u8]) -> KeySet {
        use jsonwebtoken::Algorithm;
        let mut set = KeySet::default();
        set.add(super::super::keys::PinnedKey {
            kid: Some("k".into()),
            alg: Algorithm::HS256,
            key: super::super::keys::from_secret(Algorithm::HS256, secret).unwrap(),
        });
        set
    }

    #[tokio::test]
    async fn a_panicking_fetch_releases_its_claim_and_keeps_the_keys() {
        let r = Arc::new(remote());
        let t0 = Instant::now();
        assert!(r.claim_scheduled(t0));
        Arc::clone(&r)
            .run_claimed(async { Ok(set_with(b"first")) })
            .await;
        assert_eq!(r.keys().len(), 1);

        let finished = r.finished.subscribe();
        let later = Instant::now() + r.settings.refresh;
        assert!(r.claim_scheduled(later));
        Arc::clone(&r)
            .run_claimed(async { panic!("a bug in a refresh") })
            .await;
        assert!(finished.has_changed().unwrap(), "waiters were told");
        assert!(r.lock().failing);
        assert_eq!(r.keys().len(), 1, "the last good keys stay");
        // Released: the next refresh is due as after any failed fetch.
        assert!(r.claim_scheduled(later + MIN_REFETCH_INTERVAL));
    }

    #[test]
    fn only_a_lost_or_changed_key_starts_a_new_generation() {
        let r = remote();
        r.install(Ok(set_with(b"one")));
        assert_eq!(r.generation(), 0, "nothing was verified before");
        r.install(Ok(set_with(b"one")));
        assert_eq!(r.generation(), 0);
        r.install(Err("down".into()));
        assert_eq!(r.generation(), 0);
        r.install(Ok(set_with(b"two")));
        assert_eq!(r.generation(), 1);
        assert!(!r.keys().lost_keys_in(&set_with(b"two")), "published");
    }

    #[test]
    fn scheduled_fetches_follow_success_and_failure() {
        let r = remote();
        let t0 = Instant::now();
        assert!(r.claim_scheduled(t0), "the first fetch is due at once");
        assert!(!r.claim_scheduled(t0), "one in flight");
        // It failed:
        r.lock().in_flight = false;
        assert!(!r.claim_scheduled(t0 + Duration::from_secs(29)));
        assert!(r.claim_scheduled(t0 + Duration::from_secs(30)));
        // It succeeded:
        {
            let mut s = r.lock();
            s.in_flight = false;
            s.last_success = Some(t0 + Duration::from_secs(31));
        }
        assert!(!r.claim_scheduled(t0 + Duration::from_secs(600)));
        assert!(r.claim_scheduled(t0 + Duration::from_secs(631)));
    }
}
