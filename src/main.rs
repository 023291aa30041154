//! The `tollgate` command line: parse arguments, load config, start telemetry, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use tollgate::config::{Config, StorageMode};
use tollgate::keys::{self, NewKey, Subject};

/// jemalloc instead of glibc's malloc; see docs/performance.md for what it bought.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "LLM API gateway sidecar: quotas, budgets and exact billing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Config file (default ./config.toml, or $TOLLGATE_CONFIG).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(#[command(flatten)] Common),
    /// Validate the config and print it resolved (secrets masked). Warns on stderr when the
    /// shipped price table is more than 90 days old.
    CheckConfig(#[command(flatten)] Common),
    /// List the active price table (shipped + config overrides) with each entry's version.
    Prices(#[command(flatten)] Common),
    /// Create or upgrade the ledger schema.
    Migrate(#[command(flatten)] Common),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Set or clear limits on a key, user or tenant.
    Limits {
        #[command(subcommand)]
        cmd: LimitsCmd,
    },
    /// Show every applicable limit: used, reserved, limit, remaining, window.
    Usage {
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        common: Common,
    },
    /// Spend over a period from the ledger of record, by day, model, key… (a table with a
    /// totals row; `--json` or `--csv` for machines).
    Report(ReportArgs),
    /// Ledger rows of a period, every status, oldest first, as JSON lines (default) or
    /// CSV on stdout — to archive them before `storage.retention` deletes them.
    Export(ExportArgs),
    /// Journal backlog (`status`) or ship it now (`replay`).
    Journal {
        #[command(subcommand)]
        cmd: JournalCmd,
    },
    /// Compare live counters with the ledger; `--fix` rewrites counters from the ledger.
    /// Exits 1 when any difference was found.
    Reconcile {
        #[arg(long)]
        fix: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Recompute what settled rows cost under the current price table (per model: rows,
    /// old total, new total, difference). Dry run unless `--apply`, which writes the
    /// differences as adjustment rows (never rewriting a settled row); running it again
    /// writes nothing.
    Rerate(RerateArgs),
    /// Run the built-in fake OpenAI + Anthropic upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9099")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key and print its secret once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        /// A limit such as usd:day=5 (repeatable).
        #[arg(long = "limit")]
        limits: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    List(#[command(flatten)] Common),
    Show {
        id: String,
        #[command(flatten)]
        common: Common,
    },
    Revoke {
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct ReportArgs {
    /// Start: RFC 3339 time, a date (local midnight in [quota].timezone) or 36h / 7d / 2w ago.
    #[arg(long, default_value = "7d")]
    since: String,
    /// End (exclusive), same forms; default now.
    #[arg(long)]
    until: Option<String>,
    /// One or two of hour, day, week, month, model, upstream, key, user, tenant.
    #[arg(long, default_value = "day")]
    by: String,
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    upstream: Option<String>,
    /// Most rows (1-10000, default 1000).
    #[arg(long)]
    limit: Option<usize>,
    /// CSV rows (header line, no totals row).
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ExportArgs {
    /// First row's start: RFC 3339 time, a date (local midnight in [quota].timezone) or
    /// 36h / 7d / 2w ago.
    #[arg(long)]
    since: String,
    /// End (exclusive), same forms; default now.
    #[arg(long)]
    until: Option<String>,
    /// CSV with a header line instead of JSON lines.
    #[arg(long, conflicts_with = "jsonl")]
    csv: bool,
    /// JSON lines, one row per line (the default).
    #[arg(long)]
    jsonl: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RerateArgs {
    /// Start of the rows' `started_at`: RFC 3339 time, a date (local midnight in
    /// [quota].timezone) or 36h / 7d / 2w ago.
    #[arg(long)]
    since: String,
    /// End (exclusive), same forms; default: every row since `--since`.
    #[arg(long)]
    until: Option<String>,
    /// Only rows of this model.
    #[arg(long)]
    model: Option<String>,
    /// Write the adjustment rows (default: print what would change and write nothing).
    #[arg(long)]
    apply: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum JournalCmd {
    /// Unshipped events per target and the oldest one's time.
    Status(#[command(flatten)] Common),
    /// Ship every unshipped event to the ledger now.
    Replay {
        /// Re-ship every retained event, shipped ones included (idempotent).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct Who {
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
}

impl Who {
    fn subject(&self) -> Option<Subject> {
        if let Some(k) = &self.key {
            return Some(Subject::Key(k.clone()));
        }
        if let Some(u) = &self.user {
            return Some(Subject::User(u.clone()));
        }
        self.tenant.clone().map(Subject::Tenant)
    }
}

#[derive(Subcommand)]
enum LimitsCmd {
    /// Add or replace limits (same metric, window and scope are replaced).
    Set {
        #[command(flatten)]
        who: Who,
        #[arg(long = "limit", required = true)]
        limits: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Remove the named limits, or all limits of the subject when none are named.
    Clear {
        #[command(flatten)]
        who: Who,
        #[arg(long = "limit")]
        limits: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
}

fn load(common: &Common) -> Result<Config> {
    Config::load(&common.config).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Open the database without starting the proxy, for CLI commands.
fn open_db(cfg: &Config) -> Result<tollgate::db::Db> {
    tollgate::server::open_db(cfg).context("cannot open the database")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Where keys and limits live for this config (Postgres in shared mode).
fn key_admin(cfg: &Config) -> Result<Arc<dyn keys::KeyStore>> {
    let db = open_db(cfg)?;
    Ok(keys::open(cfg, &db)?)
}

fn print_json(v: &serde_json::Value) {
    print_line(&serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Writes a line to stdout. A closed stdout (`tollgate prices | head`) ends the output
/// quietly instead of panicking as `println!` does.
fn print_line(s: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{s}");
}

fn key_lines(k: &keys::KeyRecord) -> String {
    format!(
        "{}  {}  status={}  user={}  tenant={}  plan={}  limits=[{}]  created={}",
        k.id,
        k.name,
        k.status,
        k.user.as_deref().unwrap_or("-"),
        k.tenant.as_deref().unwrap_or("-"),
        k.plan.as_deref().unwrap_or("-"),
        k.limits.join(", "),
        k.created_at
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(common) => {
            let cfg = load(&common)?;
            tollgate::telemetry::init(&cfg.log);
            tollgate::server::serve(cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(common) => {
            let cfg = load(&common)?;
            let prices = tollgate::server::price_table(&cfg)?;
            print_json(&cfg.redacted_json());
            for (key_id, plan) in keys_on_undefined_plans(&cfg) {
                eprintln!(
                    "warning: key {key_id} is on plan `{plan}`, which is not defined in [plans]; its requests are refused (403) until it is"
                );
            }
            if let Some(warning) = prices.as_of().and_then(|as_of| {
                tollgate::billing::table::staleness_warning(as_of, chrono::Utc::now().date_naive())
            }) {
                eprintln!("warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prices(common) => prices_cmd(&common),
        Command::Migrate(common) => {
            let cfg = load(&common)?;
            let conn =
                tollgate::db::open_connection(&cfg.storage.journal_path, cfg.storage.durability)?;
            let local = tollgate::db::migrate(&conn)?;
            // Shared mode: the ledger of record is Postgres; the SQLite file is the journal.
            let (applied, journal) = match cfg.storage.mode {
                StorageMode::Embedded => (local, None),
                StorageMode::Shared => {
                    let pg = tollgate::ledger::postgres::PgLedger::new(&cfg.postgres_url())?;
                    let rt = runtime()?;
                    (rt.block_on(pg.migrate())?, Some(local))
                }
            };
            if common.json {
                let mut v = json!({"applied": applied});
                if let Some(j) = &journal {
                    v["journal"] = json!(j);
                }
                print_json(&v);
            } else if applied.is_empty() {
                print_line("schema is up to date");
            } else {
                print_line(&format!("applied migrations: {applied:?}"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(args) => report_cmd(&args),
        Command::Export(args) => export_cmd(&args),
        Command::Journal { cmd } => journal_cmd(cmd),
        Command::Reconcile { fix, common } => reconcile_cmd(fix, &common),
        Command::Rerate(args) => rerate_cmd(&args),
        Command::Keys { cmd } => keys_cmd(cmd),
        Command::Limits { cmd } => limits_cmd(cmd),
        Command::Usage { who, common } => usage_cmd(&who, &common),
        Command::MockUpstream { listen } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = mock_upstream::bind(listen)?;
                eprintln!(
                    "mock upstream listening on http://{}",
                    listener.local_addr()?
                );
                mock_upstream::serve(listener, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn prices_cmd(common: &Common) -> Result<ExitCode> {
    let cfg = load(common)?;
    let table = tollgate::server::price_table(&cfg)?;
    let as_of = table.as_of().map(|d| d.to_string());
    if common.json {
        let entries: Vec<serde_json::Value> = table.entries().map(|e| e.to_json()).collect();
        print_json(&json!({"as_of": as_of, "entries": entries}));
    } else {
        print_line(&format!(
            "price table as of {} (USD per 1M tokens; web_search USD per call; {} entries)",
            as_of.as_deref().unwrap_or("an unknown date"),
            table.entries().count()
        ));
        for e in table.entries() {
            print_line(&e.summary());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Keys in the journal (embedded: the key table; shared: the local copy of the directory)
/// whose plan `cfg` does not define. Nothing when there is no journal file yet.
fn keys_on_undefined_plans(cfg: &Config) -> Vec<(String, String)> {
    let path = &cfg.storage.journal_path;
    if !path.exists() {
        return Vec::new();
    }
    let snapshot = tollgate::db::open_connection(path, cfg.storage.durability)
        .ok()
        .and_then(|c| match cfg.storage.mode {
            StorageMode::Embedded => tollgate::keys::sqlite::snapshot_sync(&c).ok(),
            StorageMode::Shared => tollgate::keys::postgres::load_directory(&c).ok().flatten(),
        });
    match snapshot {
        Some(s) => tollgate::keys::undefined_plans(s.keys.iter().map(|(_, k)| k), |p| {
            cfg.plans.contains_key(p)
        }),
        None => Vec::new(),
    }
}

fn keys_cmd(cmd: KeysCmd) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Create {
            name,
            user,
            tenant,
            plan,
            limits,
            common,
        } => {
            let cfg = load(&common)?;
            if let Some(p) = &plan
                && !cfg.plans.contains_key(p)
            {
                bail!(
                    "plan `{p}` is not defined in [plans] of {}",
                    common.config.display()
                );
            }
            let admin = key_admin(&cfg)?;
            let (rec, secret) = runtime()?
                .block_on(admin.create(NewKey {
                    name,
                    user,
                    tenant,
                    plan,
                    limits,
                }))
                .context("cannot create the key")?;
            if common.json {
                let mut v = serde_json::to_value(&rec)?;
                v["key"] = json!(secret);
                print_json(&v);
            } else {
                print_line(&format!(
                    "id:  {}\nkey: {secret}\n(the key is shown only once; store it now)",
                    rec.id
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::List(common) => {
            let cfg = load(&common)?;
            let admin = key_admin(&cfg)?;
            let list = runtime()?.block_on(admin.list())?;
            if common.json {
                print_json(&serde_json::to_value(&list)?);
            } else {
                for k in &list {
                    print_line(&key_lines(k));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Show { id, common } => {
            let cfg = load(&common)?;
            let admin = key_admin(&cfg)?;
            let rec = runtime()?.block_on(admin.show(&id))?;
            match rec {
                Some(k) if common.json => print_json(&serde_json::to_value(&k)?),
                Some(k) => print_line(&key_lines(&k)),
                None => bail!("no such key"),
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::Revoke { id, common } => {
            let cfg = load(&common)?;
            let admin = key_admin(&cfg)?;
            let rec = runtime()?
                .block_on(admin.revoke(&id))
                .context("cannot revoke the key")?;
            match rec {
                Some(k) if common.json => print_json(&serde_json::to_value(&k)?),
                Some(k) => print_line(&format!("revoked {}", k.id)),
                None => bail!("no such key"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn limits_cmd(cmd: LimitsCmd) -> Result<ExitCode> {
    let (who, specs, common, set) = match cmd {
        LimitsCmd::Set {
            who,
            limits,
            common,
        } => (who, limits, common, true),
        LimitsCmd::Clear {
            who,
            limits,
            common,
        } => (who, limits, common, false),
    };
    let cfg = load(&common)?;
    let admin = key_admin(&cfg)?;
    let Some(subject) = who.subject() else {
        bail!("pass --key, --user or --tenant")
    };
    let rt = runtime()?;
    let now = if set {
        rt.block_on(admin.set_limits(&subject, &specs))
    } else {
        rt.block_on(admin.clear_limits(&subject, &specs))
    }
    .context("cannot change limits")?;
    if common.json {
        print_json(&json!({"subject": subject.as_text(), "limits": now}));
    } else {
        print_line(&format!("{}: [{}]", subject.as_text(), now.join(", ")));
    }
    Ok(ExitCode::SUCCESS)
}

fn usage_cmd(who: &Who, common: &Common) -> Result<ExitCode> {
    let cfg = Arc::new(load(common)?);
    let Some(subject) = who.subject() else {
        bail!("pass --key, --user or --tenant")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Ask the running instance first: it knows the holds of requests in flight.
    let live = rt.block_on(ask_admin(&cfg, &subject));
    let v = match live {
        Some(v) => v,
        None => {
            let db = open_db(&cfg)?;
            let engine = tollgate::server::build_engine(cfg.clone(), db)?;
            rt.block_on(async {
                let dir = engine.authenticator().directory();
                match &subject {
                    Subject::Key(k) => match dir.by_id(k) {
                        Some((p, _)) => Ok(engine.usage_json_for(&p, "cli").await),
                        None => Err(anyhow::anyhow!("no such key")),
                    },
                    s => {
                        let limits: Vec<_> = dir
                            .limits_of(s)
                            .iter()
                            .map(|spec| tollgate::quota::store::AppliedLimit {
                                subject: s.clone(),
                                spec: spec.clone(),
                                plan: None,
                            })
                            .collect();
                        Ok(engine.usage_json(&limits, "cli").await)
                    }
                }
            })?
        }
    };
    if common.json {
        print_json(&v);
    } else {
        let limits = v["limits"].as_array().cloned().unwrap_or_default();
        if limits.is_empty() {
            print_line("no limits apply (unlimited)");
        }
        // USD amounts are JSON strings, counts are numbers: print both bare.
        let bare = |v: &serde_json::Value| {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
        };
        for l in limits {
            print_line(&format!(
                "{:<18} {:<28} used={} reserved={} limit={} remaining={} window={}..{}",
                l["subject"].as_str().unwrap_or(""),
                l["spec"].as_str().unwrap_or(""),
                bare(&l["used"]),
                bare(&l["reserved"]),
                bare(&l["limit"]),
                bare(&l["remaining"]),
                l["window_start"].as_str().unwrap_or("-"),
                l["resets_at"].as_str().unwrap_or("-"),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `Authorization: Bearer <token>`, marked sensitive so no client log prints it.
fn bearer(token: &str) -> Option<hyper::header::HeaderValue> {
    let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Whether the process on `server.admin_listen` proves it is the instance that published
/// the secret next to the journal (see `tollgate::instance_proof`); only then may it see the
/// admin token. Says why on stderr when something answers but cannot prove it.
async fn instance_verified(cfg: &Config) -> bool {
    use http_body_util::{BodyExt, Empty};
    let Some(secret) = tollgate::instance_proof::read_secret(&cfg.storage.journal_path) else {
        return false;
    };
    let listen = cfg.server.admin_listen.to_string();
    let challenge = tollgate::instance_proof::challenge();
    let Ok(uri) = format!("http://{listen}/healthz?challenge={challenge}").parse::<hyper::Uri>()
    else {
        return false;
    };
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let Ok(Ok(resp)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), client.get(uri)).await
    else {
        return false;
    };
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return false,
    };
    let proof = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["proof"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let ok = tollgate::instance_proof::verify(&secret, &listen, &challenge, &proof);
    if !ok {
        eprintln!(
            "warning: the process on {listen} did not prove it is this tollgate instance; the admin token was not sent, reading storage instead"
        );
    }
    ok
}

async fn ask_admin(cfg: &Config, subject: &Subject) -> Option<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    let token = cfg.server.admin_token.expose();
    if token.is_empty() || !instance_verified(cfg).await {
        return None;
    }
    let (kind, id) = match subject {
        Subject::Key(k) => ("key", k),
        Subject::User(u) => ("user", u),
        Subject::Tenant(t) => ("tenant", t),
    };
    // Ids are the operator's own text: encoded, `&`, `#` or `/` in one stay part of it.
    let uri: hyper::Uri = format!(
        "http://{}/admin/usage?{kind}={}",
        cfg.server.admin_listen,
        tollgate::admin::encode_component(id)
    )
    .parse()
    .ok()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let req = hyper::Request::get(uri)
        .header("authorization", bearer(token)?)
        .body(Empty::new())
        .ok()?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(2), client.request(req))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

/// Call the running instance's admin API; `None` when it is not reachable.
async fn admin_call(
    cfg: &Config,
    method: &str,
    path_and_query: &str,
) -> Option<(u16, serde_json::Value)> {
    use http_body_util::{BodyExt, Empty};
    let token = cfg.server.admin_token.expose();
    if token.is_empty() || !instance_verified(cfg).await {
        return None;
    }
    let uri: hyper::Uri = format!("http://{}{path_and_query}", cfg.server.admin_listen)
        .parse()
        .ok()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    // The admin API takes writes as JSON only.
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", bearer(token)?)
        .header("content-type", "application/json")
        .body(Empty::new())
        .ok()?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    if status == 404 || status == 401 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&body).ok()?))
}

/// `tollgate report`: the running instance's `GET /admin/spend` when it answers, else the
/// same report computed here from the ledger of record.
fn report_cmd(args: &ReportArgs) -> Result<ExitCode> {
    let cfg = load(&args.common)?;
    let params = tollgate::spend::SpendParams {
        since: Some(args.since.clone()),
        until: args.until.clone(),
        group_by: Some(args.by.clone()),
        key: args.key.clone(),
        user: args.user.clone(),
        tenant: args.tenant.clone(),
        model: args.model.clone(),
        upstream: args.upstream.clone(),
        limit: args.limit.map(|n| n.to_string()),
    };
    let rt = runtime()?;
    let query: Vec<String> = params
        .pairs()
        .into_iter()
        .map(|(name, v)| format!("{name}={}", tollgate::admin::encode_component(v)))
        .collect();
    let path = format!("/admin/spend?{}", query.join("&"));
    let v = match rt.block_on(admin_call(&cfg, "GET", &path)) {
        Some((200, v)) => v,
        Some((_, v)) => bail!(
            "{}",
            v["error"]["message"]
                .as_str()
                .unwrap_or("the running instance refused the report")
        ),
        None => {
            let store = tollgate::spend::open(&cfg, &cfg.storage.journal_path);
            rt.block_on(tollgate::spend::report(
                &*store,
                &params,
                chrono::Utc::now(),
                cfg.quota.timezone,
            ))?
        }
    };
    if args.common.json {
        print_json(&v);
    } else if args.csv {
        use std::io::Write;
        let _ = std::io::stdout()
            .lock()
            .write_all(tollgate::spend::csv(&v).as_bytes());
    } else {
        print_line(&tollgate::spend::table(&v));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tollgate export`: rows straight from the ledger of record (the embedded SQLite file,
/// or Postgres in shared mode), streamed to stdout.
fn export_cmd(args: &ExportArgs) -> Result<ExitCode> {
    use tollgate::spend::export::{self, Format, Writer};
    let cfg = load(&args.common)?;
    let now = chrono::Utc::now();
    let tz = cfg.quota.timezone;
    let since = tollgate::spend::parse_time("since", &args.since, now, tz)?;
    let until = match &args.until {
        Some(v) => tollgate::spend::parse_time("until", v, now, tz)?,
        None => now,
    };
    if since >= until {
        bail!("`--since` must be before `--until`");
    }
    let format = if args.csv { Format::Csv } else { Format::Jsonl };
    let stdout = std::io::stdout();
    let mut w = Writer::new(std::io::BufWriter::new(stdout.lock()), format)?;
    match cfg.storage.mode {
        StorageMode::Embedded => {
            // Apply pending migrations first (the file may predate this version).
            drop(open_db(&cfg)?);
            export::from_sqlite(&cfg.storage.journal_path, since, until, &mut w)?;
        }
        StorageMode::Shared => {
            let pg = tollgate::ledger::postgres::PgLedger::new(&cfg.postgres_url())?;
            runtime()?.block_on(export::from_pg(&pg, since, until, &mut w))?;
        }
    }
    w.finish()?;
    Ok(ExitCode::SUCCESS)
}

fn journal_cmd(cmd: JournalCmd) -> Result<ExitCode> {
    match cmd {
        JournalCmd::Status(common) => {
            let cfg = load(&common)?;
            let rt = runtime()?;
            let v = match rt.block_on(admin_call(&cfg, "GET", "/admin/journal")) {
                Some((200, v)) => v,
                _ => match cfg.storage.mode {
                    StorageMode::Embedded => json!({"backlog": {}}),
                    StorageMode::Shared => {
                        let db = open_db(&cfg)?;
                        let (n, oldest) =
                            db.call_blocking(tollgate::journal::outbox::backlog_sync)?;
                        let quarantined =
                            db.call_blocking(tollgate::journal::outbox::quarantine_count)?;
                        json!({"backlog": {"postgres": n}, "oldest_unshipped_at": if n == 0 { None } else { oldest }, "quarantined": quarantined})
                    }
                },
            };
            if common.json {
                print_json(&v);
            } else {
                match v["backlog"].as_object() {
                    Some(m) if !m.is_empty() => {
                        for (target, n) in m {
                            print_line(&format!("{target}: {n} unshipped"));
                        }
                        if let Some(t) = v["oldest_unshipped_at"].as_str() {
                            print_line(&format!("oldest unshipped event: {t}"));
                        }
                        if let Some(q) = v["quarantined"].as_u64().filter(|q| *q > 0) {
                            print_line(&format!(
                                "quarantined: {q} events the ledger of record refused (see journal_quarantine)"
                            ));
                        }
                    }
                    _ => print_line("embedded mode: the ledger is the journal; nothing to ship"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JournalCmd::Replay { all, common } => {
            let cfg = load(&common)?;
            if cfg.storage.mode == StorageMode::Embedded {
                if common.json {
                    print_json(&json!({"shipped": 0, "rows": 0}));
                } else {
                    print_line("embedded mode: the ledger is the journal; nothing to ship");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let db = open_db(&cfg)?;
            let outbox = tollgate::journal::open_outbox(&cfg, db)?;
            let mut shipper =
                tollgate::journal::shipper::Shipper::new(outbox, cfg.storage.journal_retention);
            let done = runtime()?
                .block_on(shipper.ship_all(all))
                .context("cannot ship the journal")?;
            if common.json {
                print_json(&json!({"shipped": done.events, "rows": done.rows}));
            } else {
                print_line(&format!(
                    "shipped {} events ({} ledger rows changed)",
                    done.events, done.rows
                ));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `tollgate rerate`: read the settled rows of the range from the ledger of record (the
/// SQLite file in embedded mode, Postgres in shared mode), re-rate them under the config's
/// price table, print per model what changes, and with `--apply` write the adjustment rows
/// there, then bring the live counters to the ledger (the running instance's reconcile
/// `--fix`; in shared mode without one, the same here against Redis).
fn rerate_cmd(args: &RerateArgs) -> Result<ExitCode> {
    let cfg = Arc::new(load(&args.common)?);
    let table = tollgate::server::price_table(&cfg)?;
    let now = chrono::Utc::now();
    let tz = cfg.quota.timezone;
    let time = |name: &str, v: &str| -> Result<String> {
        let t =
            tollgate::spend::parse_time(name, v, now, tz).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(tollgate::time::to_text(t))
    };
    let filter = tollgate::rerate::Filter {
        since: time("since", &args.since)?,
        until: args
            .until
            .as_deref()
            .map(|u| time("until", u))
            .transpose()?,
        model: args.model.clone(),
    };
    let rt = runtime()?;
    let now_text = tollgate::time::to_text(now);
    let (plan, written) = match cfg.storage.mode {
        StorageMode::Embedded => {
            let conn =
                tollgate::db::open_connection(&cfg.storage.journal_path, cfg.storage.durability)?;
            tollgate::db::migrate(&conn)?;
            let (rows, adjusted) = tollgate::rerate::sqlite_rows(&conn, &filter)?;
            let plan = tollgate::rerate::plan(&rows, &adjusted, &table, &now_text);
            let written = if args.apply {
                tollgate::rerate::sqlite_write(&conn, &plan.adjustments)? as u64
            } else {
                0
            };
            (plan, written)
        }
        StorageMode::Shared => {
            let pg = tollgate::ledger::postgres::PgLedger::new(&cfg.postgres_url())?;
            rt.block_on(async {
                let (rows, adjusted) = tollgate::rerate::pg_rows(&pg, &filter).await?;
                let plan = tollgate::rerate::plan(&rows, &adjusted, &table, &now_text);
                let written = if args.apply {
                    tollgate::rerate::pg_write(&pg, &plan.adjustments).await?
                } else {
                    0
                };
                Ok::<_, tollgate::pg::PgError>((plan, written))
            })?
        }
    };
    // Live counters: rebuilt from the ledger, which now holds the adjustments.
    let mut counters = "unchanged";
    if written > 0 {
        counters = match rt.block_on(admin_call(&cfg, "POST", "/admin/reconcile?fix=true")) {
            Some((200, _)) => "rebuilt by the running instance",
            Some((_, v)) => bail!(
                "adjustments written, but the running instance could not rebuild its counters ({}); run `tollgate reconcile --fix`",
                v["error"]["message"].as_str().unwrap_or("unknown error")
            ),
            None if cfg.storage.mode == StorageMode::Shared => {
                let db = open_db(&cfg)?;
                let engine = tollgate::server::build_engine(cfg.clone(), db)?;
                rt.block_on(tollgate::reconcile::reconcile(&engine, true))?;
                "rebuilt in Redis"
            }
            None => "loaded from the ledger at the next start",
        };
    }
    let mut v = plan.to_json();
    v["applied"] = json!(args.apply);
    v["written"] = json!(written);
    v["counters"] = json!(counters);
    if args.common.json {
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    print_line(&format!(
        "{:<32} {:>8} {:>16} {:>16} {:>16}",
        "model", "rows", "old total", "new total", "difference"
    ));
    let models = v["models"].as_array().cloned().unwrap_or_default();
    for m in models.iter().chain(std::iter::once(&v["total"])) {
        print_line(&format!(
            "{:<32} {:>8} {:>16} {:>16} {:>16}",
            m["model"].as_str().unwrap_or("total"),
            m["rows"],
            m["old_total"].as_str().unwrap_or(""),
            m["new_total"].as_str().unwrap_or(""),
            m["difference"].as_str().unwrap_or("")
        ));
    }
    let skipped = &v["skipped"];
    if skipped["unversioned"] != 0 || skipped["unpriced"] != 0 {
        print_line(&format!(
            "skipped: {} rows without a recorded price version, {} rows of models without a price",
            skipped["unversioned"], skipped["unpriced"]
        ));
    }
    if args.apply {
        print_line(&format!(
            "wrote {written} adjustment rows ({} differences); counters {counters}",
            plan.adjustments.len()
        ));
    } else {
        print_line(&format!(
            "dry run: {} adjustment rows would be written; pass --apply to write them",
            plan.adjustments.len()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn reconcile_cmd(fix: bool, common: &Common) -> Result<ExitCode> {
    let cfg = Arc::new(load(common)?);
    let rt = runtime()?;
    let (method, path) = if fix {
        ("POST", "/admin/reconcile?fix=true")
    } else {
        ("GET", "/admin/reconcile")
    };
    // The running instance holds the live counters; without one, compare a fresh rebuild.
    let v = match rt.block_on(admin_call(&cfg, method, path)) {
        Some((200, v)) => v,
        Some((_, v)) => bail!(
            "the running instance cannot reconcile: {}",
            v["error"]["message"].as_str().unwrap_or("unknown error")
        ),
        None => {
            let db = open_db(&cfg)?;
            let engine = tollgate::server::build_engine(cfg.clone(), db)?;
            rt.block_on(tollgate::reconcile::reconcile(&engine, fix))?
                .to_json()
        }
    };
    let diffs = v["differences"].as_array().cloned().unwrap_or_default();
    if common.json {
        print_json(&v);
    } else if diffs.is_empty() {
        print_line("counters match the ledger");
    } else {
        for d in &diffs {
            print_line(&format!(
                "{:<20} {:<28} counter={} ledger={}",
                d["subject"].as_str().unwrap_or(""),
                d["spec"].as_str().unwrap_or(""),
                d["counter"],
                d["ledger"]
            ));
        }
        if v["fixed"] == true {
            print_line("counters rewritten from the ledger");
        }
    }
    Ok(if diffs.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
