//! Start-up: build every component from a [`Config`] and run the pingora server until
//! SIGTERM/SIGINT. Kept out of `main.rs` so tests and tools can start the same thing.

use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};

use crate::auth::DirectoryRoots;
use crate::auth::{Authenticator, Directory};
use crate::billing::table::PriceTable;
use crate::config::{Config, StorageMode};
use crate::db::Db;
use crate::engine::Engine;
use crate::journal::Journal;
use crate::journal::applier::{Applier, LimitsOf};
use crate::journal::outbox::Outbox;
use crate::ledger::SqliteLoader;
use crate::proxy::Gateway;
use crate::proxy::listener::Guarded;
use crate::quota::fallback::{Backlog, FallbackStore, LastKnown};
use crate::quota::fleet::{AloneOrNotBelow, Fleet, FleetGate};
use crate::quota::memory::{CounterLoader, MemoryStore};
use crate::quota::redis::RedisOptions;
use crate::quota::shared::LazyRedis;
use crate::quota::store::QuotaStore;
use crate::upstream::{Upstream, resolve_loop};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("{0}")]
    Invalid(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Shared(#[from] crate::journal::SharedError),
}

/// Open the embedded database named by the config.
pub fn open_db(config: &Config) -> Result<Db, StartError> {
    Ok(Db::open(
        &config.storage.journal_path,
        config.storage.durability,
    )?)
}

/// Unless `server.instance_id` is configured, take the journal's durable identity: made
/// once (`<hostname>-<random>`) and kept in the journal file, so a recreated container or
/// a changed port is still the same instance (its heartbeat, its rows' `instance_id`).
pub fn adopt_instance_identity(config: &mut Config, db: &Db) -> Result<(), StartError> {
    if config.server.instance_id_configured {
        return Ok(());
    }
    let simple = uuid::Uuid::now_v7().simple().to_string();
    let tail = simple
        .get(simple.len().saturating_sub(8)..)
        .unwrap_or_default();
    let generated = format!("{}-{tail}", crate::config::hostname());
    config.server.instance_id =
        db.call_blocking(move |c| crate::journal::outbox::instance_identity(c, &generated))?;
    Ok(())
}

/// Build the engine (storage, keys, prices, counters) without starting any listener.
pub fn build_engine(config: Arc<Config>, db: Db) -> Result<Arc<Engine>, StartError> {
    Ok(build_engine_parts(config, db)?.0)
}

/// [`build_engine`], also returning the shared-mode outbox (for the shipper).
///
/// Shared mode: keys and limits come from Postgres (or the journal's local copy while it
/// is down), the journal is the outbox, and counters are rebuilt from the Postgres ledger
/// plus unshipped journal rows. Counters stay in the in-process [`MemoryStore`] behind the
/// same `QuotaStore` trait as the Redis store.
pub fn build_engine_parts(
    config: Arc<Config>,
    db: Db,
) -> Result<(Arc<Engine>, Option<Arc<Outbox>>), StartError> {
    let (snapshot, outbox) = match config.storage.mode {
        StorageMode::Embedded => (db.call_blocking(crate::keys::sqlite::snapshot_sync)?, None),
        StorageMode::Shared => {
            let outbox = crate::journal::open_outbox(&config, db.clone())?;
            (
                crate::keys::postgres::initial_snapshot(&config, &db)?,
                Some(outbox),
            )
        }
    };
    let source = crate::keys::source_for(&config, &db, outbox.as_ref().map(|o| o.pg().pool()));
    let auth = Authenticator::with_source(Directory::from_snapshot(snapshot), source);
    let prices = price_table(&config)?;
    let loader: Arc<dyn CounterLoader> = match &outbox {
        Some(ob) => ob.ledger_loader(),
        None => Arc::new(SqliteLoader { db: db.clone() }),
    };
    let mut fallback: Option<Arc<FallbackStore>> = None;
    let store: Arc<dyn QuotaStore> = match (&config.storage.mode, &config.storage.redis_url) {
        (StorageMode::Shared, Some(url)) => {
            // Redis's counters outlive an outage: a reseed while Postgres is unreachable
            // never goes below the last state Redis reported (SPEC §4).
            let known = Arc::new(LastKnown::default());
            // The share starts from what the previous run last heard, so a process
            // started during an outage does not take the whole remainder.
            let recorded = db
                .call_blocking(|c| crate::journal::outbox::meta_get(c, FLEET_LIVE))
                .ok()
                .flatten()
                .and_then(|v| v.parse::<usize>().ok());
            let last_live = recorded.unwrap_or(1);
            let has_history = db
                .call_blocking(|c| {
                    Ok(
                        c.query_row("SELECT EXISTS (SELECT 1 FROM journal_events)", [], |r| {
                            r.get::<_, bool>(0)
                        })?,
                    )
                })
                .unwrap_or(false);
            let alone_at_start = match recorded {
                Some(n) => n <= 1,
                None => has_history,
            };
            let fleet =
                Arc::new(Fleet::new(config.server.instance_id.clone()).with_last_live(last_live));
            {
                let db = db.clone();
                fleet.on_live(move |n| {
                    let db = db.clone();
                    tokio::spawn(async move {
                        let v = n.to_string();
                        if let Err(e) = db
                            .call(move |c| crate::journal::outbox::meta_set(c, FLEET_LIVE, &v))
                            .await
                        {
                            tracing::warn!(error = %e, "cannot keep the fleet size in the journal");
                        }
                    });
                });
            }
            let (seed, local_seed): (Arc<dyn CounterLoader>, Arc<dyn CounterLoader>) = match &outbox
            {
                Some(ob) => {
                    let not_below = || {
                        crate::journal::loader::SharedLoader::new(
                            ob.pg().clone(),
                            ob.reader().clone(),
                        )
                        .not_below(known.clone())
                    };
                    (
                        // A counter missing in Redis waits for the other instances'
                        // backlogs before it is rebuilt: a ledger without them counts
                        // them never, or twice once they replay.
                        Arc::new(FleetGate {
                            inner: Arc::new(not_below()),
                            fleet: fleet.clone(),
                        }),
                        Arc::new(AloneOrNotBelow {
                            not_below: Arc::new(not_below()),
                            journal: ob.ledger_loader(),
                            fleet: fleet.clone(),
                            alone_at_start,
                        }),
                    )
                }
                None => (loader.clone(), loader.clone()),
            };
            let redis = Arc::new(LazyRedis::new(
                url.expose().to_string(),
                RedisOptions::new(config.quota.timezone, config.quota.reservation_ttl),
                Some(seed),
                Arc::new(DirectoryRoots { auth: auth.clone() }),
            ));
            let f = Arc::new(FallbackStore::new(
                redis,
                config.storage.on_unavailable,
                config.quota.timezone,
                Some(local_seed),
                known,
            ));
            f.set_fleet(fleet);
            fallback = Some(f.clone());
            f
        }
        _ => Arc::new(MemoryStore::new(config.quota.timezone, Some(loader))),
    };
    let upstreams = Arc::new(
        config
            .upstreams
            .iter()
            .cloned()
            .map(Upstream::new)
            .collect::<Vec<_>>(),
    );
    let mut engine = Engine::new(config, auth, db, store.clone(), upstreams, prices)
        .map_err(StartError::Invalid)?;
    if let Some(ob) = &outbox {
        engine = engine.with_journal(ob.clone());
    }
    let engine = Arc::new(engine);
    // Shared counters in Redis: every settle and release reaches them through the
    // journal's applier, which also replays what a down Redis missed before it is
    // authoritative again.
    if let (Some(ob), Some(f)) = (&outbox, &fallback) {
        let limits: std::sync::Weak<dyn LimitsOf> = Arc::downgrade(&engine) as _;
        let applier = Applier::new(ob.clone(), store, limits);
        if let Some(fleet) = f.fleet_handle() {
            applier.set_fleet(fleet);
        }
        let backlog: std::sync::Weak<dyn Backlog> = Arc::downgrade(&applier) as _;
        f.set_backlog(backlog);
        engine.set_applier(applier);
    }
    Ok((engine, outbox))
}

/// `journal_meta` name of the last fleet size heard (`quota::fleet`).
const FLEET_LIVE: &str = "fleet_live";

/// Log (at error level) every active key whose plan the configuration does not define, at
/// start and whenever the key directory changes (a refresh from another instance's
/// writes, in shared mode): such keys are refused until the plan is defined.
async fn plan_watch(engine: Arc<Engine>) {
    let mut seen_rev = None;
    let mut reported: Vec<(String, String)> = Vec::new();
    loop {
        let rev = engine.authenticator().directory().rev;
        if seen_rev != Some(rev) {
            seen_rev = Some(rev);
            let now = engine.keys_with_undefined_plans();
            for (key_id, plan) in now.iter().filter(|k| !reported.contains(k)) {
                tracing::error!(key_id = %key_id, plan = %plan, "key is on a plan the configuration does not define ([plans.{plan}]); its requests are refused until the plan is defined");
            }
            reported = now;
        }
        tokio::time::sleep(crate::auth::REFRESH_EVERY * 4).await;
    }
}

/// Watch the quota store's reachability: log and count every transition, and let a
/// down Redis come back (its probe replays queued settles).
async fn probe_loop(engine: Arc<Engine>) {
    let mut last: Vec<(&'static str, bool)> = engine.store().health();
    loop {
        // First pass at once: the first heartbeat tells this instance who else enforces
        // the same limits.
        engine.store().recover().await;
        let now = engine.store().health();
        for (name, up) in &now {
            engine.metrics().set_store_up(name, *up);
            if !last.contains(&(name, *up)) {
                if *up {
                    tracing::info!(store = name, "store up");
                } else {
                    tracing::warn!(store = name, "store down");
                }
            }
        }
        last = now;
        tokio::time::sleep(crate::quota::fallback::PROBE_EVERY).await;
    }
}

/// The shipped price table with the config's `[prices]` entries on top.
pub fn price_table(config: &Config) -> Result<PriceTable, StartError> {
    PriceTable::with_overrides(config.prices.clone())
        .map_err(|e| StartError::Invalid(e.to_string()))
}

/// Background work of a running instance: key directory refresh, DNS, admin listener,
/// alert delivery, ledger retention.
struct Background {
    engine: Arc<Engine>,
    outbox: Option<Arc<Outbox>>,
}

#[async_trait::async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let e = self.engine.clone();
        let refresh = tokio::spawn(crate::auth::refresh_loop(e.authenticator().clone()));
        let shipper = self.outbox.clone().map(|ob| {
            let retention = e.config().storage.journal_retention;
            tokio::spawn(crate::journal::shipper::Shipper::new(ob, retention).run())
        });
        let applier = e.applier().map(|a| tokio::spawn(a.clone().run()));
        // `storage.retention`: passes over the ledger of record (Postgres in shared mode).
        let retention = e.config().storage.retention.map(|keep| {
            let target = match &self.outbox {
                Some(ob) => crate::spend::retention::Target::Postgres(ob.pg().clone()),
                None => crate::spend::retention::Target::Embedded(e.db().clone()),
            };
            tokio::spawn(crate::spend::retention::run_loop(target, keep))
        });
        let dns = tokio::spawn(resolve_loop(e.upstreams().clone()));
        let probe = tokio::spawn(probe_loop(e.clone()));
        let plans = tokio::spawn(plan_watch(e.clone()));
        let admin = tokio::spawn(crate::admin::serve(e.clone()));
        let alerts = e.alerts().take_worker().map(|w| tokio::spawn(w.run()));
        let _ = shutdown.changed().await;
        refresh.abort();
        if let Some(s) = shipper {
            s.abort();
        }
        if let Some(a) = applier {
            a.abort();
        }
        if let Some(r) = retention {
            r.abort();
        }
        dns.abort();
        probe.abort();
        plans.abort();
        admin.abort();
        if let Some(a) = alerts {
            a.abort();
        }
        // pingora stopped accepting and now sleeps through the grace period before it drops
        // its runtimes. Requests still open finish (and settle) meanwhile; once none is
        // left there is nothing to wait for, so end the process early.
        let grace = e.config().server.grace_period;
        let deadline = std::time::Instant::now() + grace;
        loop {
            let open = e.in_flight();
            if open == 0 {
                tracing::info!("all requests finished; exiting");
                std::process::exit(0);
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    open,
                    "grace period over with requests still open; their reservations are recovered at the next start"
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Apply the Postgres migrations before anything reads it. Best effort: with Postgres down
/// the instance still starts (it serves from its journal) and the shipper migrates
/// before its first shipment.
fn migrate_postgres(config: &Config) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pg = crate::ledger::postgres::PgLedger::new(&config.postgres_url())
        .map_err(crate::journal::SharedError::from)?;
    match rt.block_on(pg.migrate()) {
        Ok(v) if v.is_empty() => {}
        Ok(v) => tracing::info!(applied = ?v, "postgres schema migrated"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot migrate the postgres schema yet; will retry")
        }
    }
    Ok(())
}

/// Run the proxy until a shutdown signal. Blocks the calling thread.
pub fn serve(mut config: Config) -> Result<(), StartError> {
    let db = open_db(&config)?;
    adopt_instance_identity(&mut config, &db)?;
    let config = Arc::new(config);
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Tokenizer tables take 100-200 ms to build: pay that before the first request.
    crate::tokens::warm();
    if config.storage.mode == StorageMode::Shared {
        migrate_postgres(&config)?;
    }
    let (engine, outbox) = build_engine_parts(config.clone(), db)?;
    if let Some(warning) = engine.prices().as_of().and_then(|as_of| {
        crate::billing::table::staleness_warning(as_of, chrono::Utc::now().date_naive())
    }) {
        tracing::warn!("{warning}");
    }

    // Finish what a previous run left open in this journal, before serving. In shared
    // mode with Redis the recovered settles are journal events the applier brings to the
    // shared counters as soon as it runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match engine.recover_open_reservations().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(recovered = n, "settled open reservations left by a previous run"),
            Err(e) => tracing::error!(error = %e, "cannot recover open reservations"),
        }
        for u in engine.upstreams().iter() {
            if let Err(e) = u.resolve().await {
                tracing::warn!(upstream = %u.cfg.name, error = %e, "cannot resolve upstream yet; will retry");
            }
        }
    });
    drop(rt);

    let conf = ServerConf {
        threads: config.server.threads,
        // On SIGTERM pingora stops accepting, then waits `grace_period_seconds` while open
        // requests run to their end (settling in the task `logging` spawns), then drops its
        // runtimes. The background service exits earlier once nothing is in flight.
        grace_period_seconds: Some(config.server.grace_period.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // pingora's HTTP proxy behind the connection cap and the request-head deadline.
    let app = pingora::proxy::http_proxy(&server.configuration, Gateway::new(engine.clone()));
    let mut proxy = pingora::services::listening::Service::new(
        "tollgate proxy".to_string(),
        Guarded::new(app, engine.clone()),
    );
    proxy.add_tcp(&config.server.listen.to_string());
    server.add_service(proxy);
    server.add_service(background_service(
        "tollgate",
        Background {
            engine: engine.clone(),
            outbox,
        },
    ));
    tracing::info!(
        listen = %config.server.listen,
        admin = %config.server.admin_listen,
        mode = ?config.storage.mode,
        instance_id = %config.server.instance_id,
        upstreams = config.upstreams.len(),
        "tollgate serving"
    );
    server.run(RunArgs::default());
    Ok(())
}
