//! The verbs: each turns parsed arguments into API calls and output.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use taidon_api::{EngineRequest, InstanceInfo, PrepareEvent, PrepareRequest};
use taidon_core::StateId;

use crate::args::{Cli, Command, Global, Prepare, PrepareWhat, PsqlArgs, Run, RunKind};
use crate::client::{Client, ClientError};
use crate::daemon::{choose_home, find_in_path, DaemonError, Home, HomeEnv};
use crate::error::Error;
use crate::progress::{Renderer, Target};
use crate::render;
use crate::run::{self, RunError};

/// How long `shutdown` waits for the daemon's process to end.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// Writes to stdout; a closed pipe surfaces as an error that exits cleanly.
pub(crate) fn out(text: &str) -> Result<(), Error> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Writes to stderr; there is nowhere to report a failure to.
fn err(text: &str) {
    if !text.is_empty() {
        let mut stderr = io::stderr().lock();
        let _ = stderr.write_all(text.as_bytes());
        let _ = stderr.flush();
    }
}

fn json_line<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Output(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    out(&format!("{text}\n"))
}

/// The steps of a prepare, with every file they read (each script's include closure) hashed;
/// reads stdin for `-f -`.
pub(crate) fn collect_inputs(psql: &PsqlArgs) -> Result<crate::inputs::Collected, Error> {
    let cwd = std::env::current_dir().map_err(Error::Cwd)?;
    collect_inputs_in(psql, &cwd)
}

/// [`collect_inputs`] with psql's working directory at `cwd`.
fn collect_inputs_in(psql: &PsqlArgs, cwd: &Path) -> Result<crate::inputs::Collected, Error> {
    let cwd = cwd.to_path_buf();
    let mut cache = crate::inputs::HashCache::load();
    let collected = crate::inputs::collect(psql, &cwd, &mut cache, &mut io::stdin().lock())?;
    cache.save();
    Ok(collected)
}

/// Uploads the blobs the controller lacks; returns how many bytes went up.
async fn send_inputs(
    client: &Client,
    inputs: &crate::inputs::Collected,
    global: &Global,
) -> Result<u64, Error> {
    let all: Vec<String> = inputs.blobs.keys().cloned().collect();
    if all.is_empty() {
        return Ok(0);
    }
    let missing = client.blobs_missing(&all).await?;
    let mut bytes = 0;
    for sha in &missing {
        let Some(source) = inputs.blobs.get(sha) else {
            continue;
        };
        if let Err(e) = client.put_blob(sha, source).await {
            // Name the file the server refused.
            return Err(match (e, source) {
                (ClientError::Api(mut api), crate::client::BlobSource::File(path)) => {
                    api.message = format!("cannot upload {}: {}", path.display(), api.message);
                    Error::Api(api)
                }
                (other, _) => other.into(),
            });
        }
        bytes += match source {
            crate::client::BlobSource::Bytes(b) => b.len() as u64,
            crate::client::BlobSource::File(p) => {
                std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            }
        };
    }
    if global.verbose > 0 && global.json {
        err(&format!(
            "{}\n",
            serde_json::json!({
                "event": "inputs",
                "files": all.len(),
                "uploaded": missing.len(),
                "uploaded_bytes": bytes,
            })
        ));
    } else if global.verbose > 0 {
        err(&format!(
            "sqlrs: inputs: {} file{}, {} uploaded ({})\n",
            all.len(),
            if all.len() == 1 { "" } else { "s" },
            missing.len(),
            render::human_size(bytes)
        ));
    }
    Ok(bytes)
}

/// What the command line asks, with the home it works in and the server it names.
struct Ctx {
    global: Global,
    home: Home,
    /// A shared server; `None`: the local daemon of `home`.
    server: Option<crate::remote::Server>,
}

impl Ctx {
    /// A client of the server, or of the local daemon, started first if none runs.
    async fn client(&self) -> Result<Client, Error> {
        if let Some(server) = &self.server {
            return Ok(Client::remote(server)?);
        }
        let daemon = self.home.find_or_start().await?;
        Ok(Client::new(&daemon).map_err(DaemonError::Http)?)
    }
}

/// Runs a parsed command line; returns the exit code.
pub(crate) async fn execute(cli: Cli) -> Result<i32, Error> {
    let dir = choose_home(cli.global.home.as_deref(), &HomeEnv::from_process())?;
    // The daemon gets this path and may run with another cwd.
    let dir = std::path::absolute(&dir).map_err(Error::Cwd)?;
    let server = crate::remote::choose(&cli.global, &crate::remote::RemoteEnv::from_process())?;
    let ctx = Ctx {
        global: cli.global,
        home: Home::new(dir)?,
        server,
    };
    match cli.command {
        Command::Prepare(p) => prepare(&ctx, p).await,
        Command::Plan {
            prepare: p,
            explain,
        } => plan(&ctx, p, explain).await,
        Command::Run(r) => run_instance(&ctx, r).await,
        Command::Ls => ls(&ctx).await,
        Command::Rm { id, force } => rm(&ctx, &id, force).await,
        Command::Push { id } => push(&ctx, &id).await,
        Command::Dsn(d) => dsn(&ctx, d).await,
        Command::Status => status(&ctx).await,
        Command::Fsck { repair } => fsck(&ctx, repair).await,
        Command::Shutdown => shutdown(&ctx).await,
        Command::Version => out(&version()).map(|()| 0),
        Command::Completions(shell) => out(crate::complete::script(shell)).map(|()| 0),
        Command::Complete(words) => complete(&ctx, &words).await,
        Command::Pin(a) => pin(&ctx, a, true).await,
        Command::Unpin(a) => pin(&ctx, a, false).await,
        Command::Warmup(w) => warmup(&ctx, w).await,
        Command::Events { id } => events(&ctx, id.as_deref()).await,
        Command::Lease(a) => lease(&ctx, a).await,
        Command::Release { lease } => release(&ctx, &lease).await,
        Command::Leases => leases(&ctx).await,
    }
}

/// `sqlrs --version`.
pub(crate) fn version() -> String {
    format!("sqlrs {}\n", env!("CARGO_PKG_VERSION"))
}

/// The end of a successful prepare.
struct Prepared {
    state_id: StateId,
    cache_hit: bool,
    instance: InstanceInfo,
}

/// What a prepare builds, where its tools run, and on which engine: a recipe of sqlrs.toml
/// is looked up, and the file's engine applies unless flags say otherwise.
fn resolve_prepare(p: &Prepare) -> Result<(PrepareWhat, PathBuf, EngineRequest), Error> {
    let cwd = std::env::current_dir().map_err(Error::Cwd)?;
    let found = crate::project::find(&cwd)?;
    let (what, root, version, mut settings) = match (&p.what, &found) {
        (PrepareWhat::Recipe(name), None) => {
            let _ = name;
            return Err(crate::project::ProjectFileError::Missing {
                cwd: cwd.display().to_string(),
            }
            .into());
        }
        (PrepareWhat::Recipe(name), Some(f)) => {
            let recipe = f
                .project
                .recipe(name)
                .map_err(crate::project::ProjectFileError::from)?;
            let what = crate::args::recipe_what(&recipe.kind, &recipe.args)?;
            (
                what,
                f.root.clone(),
                recipe.engine.map(|v| v.to_string()),
                recipe.settings,
            )
        }
        (what, found) => (
            what.clone(),
            cwd,
            found
                .as_ref()
                .and_then(|f| f.project.engine.version.map(|v| v.to_string())),
            found
                .as_ref()
                .map(|f| f.project.engine.settings.clone())
                .unwrap_or_default(),
        ),
    };
    // Flags override the file.
    settings.extend(p.engine.settings.clone());
    let engine = EngineRequest {
        version: p.engine.version.clone().or(version),
        settings,
    };
    Ok((what, root, engine))
}

async fn prepare(ctx: &Ctx, p: Prepare) -> Result<i32, Error> {
    let (inputs, mut req, root) = prepare_request(&p)?;
    let client = ctx.client().await?;
    let uploaded_bytes = send_inputs(&client, &inputs, &ctx.global).await?;
    req.steps = inputs.steps;
    let prepared = stream_prepare(&client, &req, &ctx.global, &root).await?;
    let instance = prepared.instance;
    let Some(run) = &p.run else {
        if ctx.global.json {
            json_line(&serde_json::json!({
                "state_id": prepared.state_id,
                "instance_id": instance.instance_id,
                "dsn": instance.dsn,
                "cache_hit": prepared.cache_hit,
                "uploaded_bytes": uploaded_bytes,
            }))?;
        } else {
            out(&format!("DSN={}\n", instance.dsn))?;
        }
        return Ok(0);
    };
    prepare_run(ctx, &client, &p, run, instance).await
}

/// `lease RECIPE|ID`: a recipe of sqlrs.toml is prepared first (built once, however many
/// leases ask at the same time: the daemon builds each state once), then a fresh copy of its
/// state is leased.
async fn lease(ctx: &Ctx, a: crate::args::LeaseArgs) -> Result<i32, Error> {
    let cwd = std::env::current_dir().map_err(Error::Cwd)?;
    let found = crate::project::find(&cwd)?;
    // Why WHAT is no recipe of the file, if there is a file and it is none.
    let not_a_recipe = found.as_ref().map(|f| f.project.recipe(&a.what).err());
    let is_recipe = matches!(not_a_recipe, Some(None));
    let client = ctx.client().await?;
    let state = if is_recipe {
        let p = Prepare {
            keep: false,
            engine: Default::default(),
            what: PrepareWhat::Recipe(a.what.clone()),
            run: None,
        };
        let (inputs, mut req, root) = prepare_request(&p)?;
        send_inputs(&client, &inputs, &ctx.global).await?;
        req.steps = inputs.steps;
        req.create_instance = false;
        let events = client.prepare(&req).await?;
        let PrepareEvent::Done { state_id, .. } =
            follow(&client, events, &ctx.global, &root).await?
        else {
            return Err(ClientError::StreamEnded.into());
        };
        state_id.to_string()
    } else {
        if taidon_core::prefix::normalize(&a.what).is_err() {
            // Neither: say what was looked for, with the recipes there are.
            return Err(match not_a_recipe.flatten() {
                Some(e) => crate::project::ProjectFileError::from(e).into(),
                None => Error::Api(taidon_api::ApiError::new(
                    taidon_api::ErrorKind::NotFound,
                    format!(
                        "{:?} is neither a state id nor a recipe: no sqlrs.toml in {} or above",
                        a.what,
                        cwd.display()
                    ),
                )),
            });
        }
        a.what.clone()
    };
    let leased = client
        .lease(&taidon_api::LeaseRequest {
            state: Some(state),
            prepare: None,
            ttl_s: a.ttl_s,
            isolation: a.isolation,
            wait_s: a.wait_s,
        })
        .await?;
    if ctx.global.json {
        json_line(&leased)?;
    } else {
        if leased.waited_ms >= 100 {
            err(&format!(
                "sqlrs: waited {:.1} s for a fresh copy\n",
                leased.waited_ms as f64 / 1000.0
            ));
        }
        out(&format!("LEASE={}\nDSN={}\n", leased.lease, leased.dsn))?;
    }
    Ok(0)
}

/// `release LEASE`.
async fn release(ctx: &Ctx, lease: &str) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let released = client.release_lease(lease).await?;
    if ctx.global.json {
        json_line(&released)?;
    } else if ctx.global.verbose > 0 {
        err(&format!("sqlrs: released lease {}\n", released.lease));
    }
    Ok(0)
}

/// `leases`.
async fn leases(ctx: &Ctx) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let leases = client.leases().await?;
    if ctx.global.json {
        json_line(&leases)?;
    } else {
        out(&render::leases(&leases, now_ms()))?;
    }
    Ok(0)
}

/// `plan[:KIND]` and `cache explain prepare[:KIND]`: the states a prepare would make, where
/// each is cached and (explain) why each hits or misses. Builds nothing.
async fn plan(ctx: &Ctx, p: Prepare, explain: bool) -> Result<i32, Error> {
    let (inputs, mut req, _root) = prepare_request(&p)?;
    let client = ctx.client().await?;
    // Liquibase plans from the files; other kinds' ids need only their hashes.
    if req.liquibase.is_some() {
        send_inputs(&client, &inputs, &ctx.global).await?;
    }
    req.steps = inputs.steps;
    req.create_instance = false;
    let plan = client.plan(&req).await?;
    if ctx.global.json {
        json_line(&plan)?;
    } else {
        out(&render::plan(&plan, explain))?;
    }
    Ok(0)
}

/// The request a prepare sends, its inputs (the steps and blobs), and where its tools run.
fn prepare_request(
    p: &Prepare,
) -> Result<(crate::inputs::Collected, PrepareRequest, PathBuf), Error> {
    let (what, root, engine) = resolve_prepare(p)?;
    let (inputs, liquibase) = match &what {
        PrepareWhat::Recipe(_) => unreachable!("resolved above"),
        PrepareWhat::Psql(psql) => (collect_inputs_in(psql, &root)?, None),
        PrepareWhat::Liquibase(lb) => {
            let (req, blobs) = crate::changelog::collect(&root, lb)?;
            let inputs = crate::inputs::Collected {
                steps: Vec::new(),
                blobs,
            };
            (inputs, Some(req))
        }
        PrepareWhat::Command(c) => {
            let inputs = crate::cmd_inputs::collect(&root, &c.inputs)?;
            let step = taidon_core::Step::Command(taidon_core::plan::CommandStep {
                argv: c.argv.clone(),
                inputs,
            });
            let inputs = crate::inputs::Collected {
                steps: vec![step],
                blobs: Default::default(),
            };
            (inputs, None)
        }
    };
    let req = PrepareRequest {
        steps: Vec::new(),
        create_instance: true,
        engine,
        liquibase,
    };
    Ok((inputs, req, root))
}

/// A prepare's run stage against the instance it made; removes it after a success (unless
/// kept).
async fn prepare_run(
    ctx: &Ctx,
    client: &Client,
    p: &Prepare,
    run: &Run,
    instance: InstanceInfo,
) -> Result<i32, Error> {
    let code = match run_against(client, run, &instance.dsn).await {
        Ok(code) => code,
        Err(e @ RunError::Spawn { .. }) => {
            err(&format!("sqlrs: {e}\n"));
            e.exit_code()
        }
        Err(e) => return Err(e.into()),
    };
    let id = instance.instance_id;
    if code != 0 {
        err(&format!(
            "sqlrs: command exited with {code}; instance {id} kept: DSN={}\n",
            instance.dsn
        ));
    } else if p.keep || run.keep {
        err(&format!(
            "sqlrs: instance {id} kept: DSN={}\n",
            instance.dsn
        ));
    } else {
        client.remove_instance(&id.to_string(), false).await?;
        if ctx.global.verbose > 0 {
            err(&format!("sqlrs: removed instance {id}\n"));
        }
    }
    Ok(code)
}

/// Reads the prepare's events, showing progress, up to its instance or its error.
async fn stream_prepare(
    client: &Client,
    req: &PrepareRequest,
    global: &Global,
    cwd: &Path,
) -> Result<Prepared, Error> {
    let events = client.prepare(req).await?;
    let done = follow(client, events, global, cwd).await?;
    let PrepareEvent::Done {
        state_id,
        cache_hit,
        instance,
    } = done
    else {
        return Err(ClientError::StreamEnded.into());
    };
    let instance = instance.ok_or_else(|| {
        Error::Api(taidon_api::ApiError::new(
            taidon_api::ErrorKind::Internal,
            "the daemon prepared the state but started no instance",
        ))
    })?;
    Ok(Prepared {
        state_id,
        cache_hit,
        instance,
    })
}

/// Shows a prepare's or a warmup's events as they come, up to its `Done` (returned) or its
/// error.
async fn follow(
    client: &Client,
    mut events: crate::client::PrepareStream,
    global: &Global,
    cwd: &Path,
) -> Result<PrepareEvent, Error> {
    let target = Target::stderr(global.json, global.verbose > 0);
    let mut progress = Renderer::new(target, global.verbose > 0, Instant::now());
    loop {
        let event = match events.next().await {
            Ok(Some(event)) => event,
            Ok(None) => {
                progress.abort();
                return Err(ClientError::StreamEnded.into());
            }
            Err(e) => {
                progress.abort();
                return Err(e.into());
            }
        };
        progress.event(&event, Instant::now());
        match event {
            done @ PrepareEvent::Done { .. } => return Ok(done),
            PrepareEvent::RunCommand {
                build, argv, dsn, ..
            } => {
                let done = run_build_command(&argv, &dsn, cwd).await;
                if global.verbose > 0 && !done.output.is_empty() {
                    err(&done.output);
                }
                client.command_done(&build, &done).await?;
            }
            PrepareEvent::Failed { error } => return Err(Error::Api(error)),
            _ => {}
        }
    }
}

/// How many bytes of a build command's output go back to the controller (its end).
const COMMAND_OUTPUT_KEPT: usize = 64 * 1024;

/// Runs a `prepare:cmd` step's command here, against the build server at `dsn`: its output
/// captured (the end of it reported), its exit code the verdict.
async fn run_build_command(argv: &[String], dsn: &str, cwd: &Path) -> taidon_api::CommandDone {
    let failed = |output: String| taidon_api::CommandDone {
        exit_code: -1,
        output,
    };
    let env = match run::child_env(dsn) {
        Ok(env) => env,
        Err(e) => return failed(e.to_string()),
    };
    let Some((program, args)) = argv.split_first() else {
        return failed("no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match cmd.output().await {
        Ok(out) => out,
        Err(e) => return failed(format!("cannot run {program}: {e}")),
    };
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if text.len() > COMMAND_OUTPUT_KEPT {
        let mut cut = text.len() - COMMAND_OUTPUT_KEPT;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("[... {cut} bytes]\n{}", &text[cut..]);
    }
    taidon_api::CommandDone {
        exit_code: run::exit_code(out.status),
        output: text,
    }
}

/// `run --instance ID`: never removes the instance.
async fn run_instance(ctx: &Ctx, run: Run) -> Result<i32, Error> {
    let id = run.instance.clone().unwrap_or_default();
    let client = ctx.client().await?;
    let instance = client.instance(&id).await?;
    if ctx.global.verbose > 0 {
        err(&format!(
            "sqlrs: instance {} of state {}\n",
            instance.instance_id,
            instance.state_id.short()
        ));
    }
    match run_against(&client, &run, &instance.dsn).await {
        Ok(code) => Ok(code),
        Err(e) => Err(e.into()),
    }
}

/// Starts the run stage's program against `dsn` and waits for it.
async fn run_against(client: &Client, run: &Run, dsn: &str) -> Result<i32, RunError> {
    let env = run::child_env(dsn)?;
    let (program, args): (OsString, &[OsString]) = match run.kind {
        RunKind::Command => match run.args.split_first() {
            Some((program, args)) => (program.clone(), args),
            None => (OsString::new(), &[]),
        },
        RunKind::Psql => (engine_program(client, "psql").await, &run.args),
        RunKind::Pgbench => (engine_program(client, "pgbench").await, &run.args),
    };
    run::run_child(&program, args, &env).await
}

/// `name` from PATH, else from the engine's bin dir, else just `name` (to fail with 127).
async fn engine_program(client: &Client, name: &str) -> OsString {
    if let Some(p) = find_in_path(name, std::env::var_os("PATH").as_deref()) {
        return p.into_os_string();
    }
    // A shared server's engine directory is on its machine, not this one.
    if client.is_remote() {
        return OsString::from(name);
    }
    if let Ok(status) = client.status().await {
        let p: PathBuf = status.engine_bin_dir.join(name);
        if p.is_file() {
            return p.into_os_string();
        }
    }
    OsString::from(name)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn ls(ctx: &Ctx) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let states = client.states().await?;
    let instances = client.instances().await?;
    if ctx.global.json {
        json_line(&serde_json::json!({ "states": states, "instances": instances }))?;
    } else {
        out(&render::ls(&states, &instances, now_ms()))?;
    }
    Ok(0)
}

async fn rm(ctx: &Ctx, typed: &str, force: bool) -> Result<i32, Error> {
    // Refuse a malformed id before starting anything.
    taidon_core::prefix::normalize(typed)?;
    let client = ctx.client().await?;
    let states = client.states().await?;
    let instances = client.instances().await?;
    let state_ids: Vec<String> = states.iter().map(|s| s.state_id.to_string()).collect();
    let instance_ids: Vec<String> = instances
        .iter()
        .map(|i| i.instance_id.to_string())
        .collect();
    let all = state_ids.iter().chain(&instance_ids).map(String::as_str);
    let id = taidon_core::prefix::resolve(typed, all)?.to_owned();
    let removed = if state_ids.contains(&id) {
        client.remove_state(&id, force).await?
    } else {
        client.remove_instance(&id, force).await?
    };
    if ctx.global.json {
        json_line(&removed)?;
    } else {
        out(&render::removed(&removed))?;
    }
    Ok(0)
}

/// `sqlrs fsck`: 0 when nothing was found or all of it was repaired, 1 otherwise.
async fn fsck(ctx: &Ctx, repair: bool) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let here = client
        .states()
        .await?
        .iter()
        .filter(|s| s.location.contains("local"))
        .count();
    err(&format!(
        "checking {here} snapshot(s){}…\n",
        if repair { " and repairing" } else { "" }
    ));
    let report = client.fsck(repair).await?;
    if ctx.global.json {
        json_line(&report)?;
    } else {
        out(&render::fsck(&report))?;
    }
    Ok(if report.clean() { 0 } else { 1 })
}

async fn push(ctx: &Ctx, typed: &str) -> Result<i32, Error> {
    taidon_core::prefix::normalize(typed)?;
    let client = ctx.client().await?;
    let pushed = client.push(typed).await?;
    if ctx.global.json {
        json_line(&pushed)?;
    } else {
        out(&render::pushed(&pushed))?;
    }
    Ok(0)
}

async fn dsn(ctx: &Ctx, d: crate::args::Dsn) -> Result<i32, Error> {
    taidon_core::prefix::normalize(&d.target)?;
    let client = ctx.client().await?;
    let minted = client
        .dsn(&taidon_api::DsnRequest {
            target: d.target,
            scope: d.scope,
            ttl_s: d.ttl_s,
        })
        .await?;
    if ctx.global.json {
        json_line(&minted)?;
    } else {
        let dsn = match d.form {
            crate::args::DsnForm::Password => &minted.dsn,
            crate::args::DsnForm::Plain => &minted.dsn_plain,
            crate::args::DsnForm::User => &minted.dsn_user,
        };
        out(&format!("DSN={dsn}\n"))?;
    }
    Ok(0)
}

async fn status(ctx: &Ctx) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let status = client.status().await?;
    if ctx.global.json {
        json_line(&status)?;
    } else {
        out(&render::status(&status))?;
    }
    Ok(0)
}

async fn shutdown(ctx: &Ctx) -> Result<i32, Error> {
    if let Some(server) = &ctx.server {
        return Err(Error::Remote(crate::remote::RemoteError::NotLocal {
            url: server.url.clone(),
        }));
    }
    let Some(daemon) = ctx.home.find().await? else {
        if ctx.global.json {
            json_line(&serde_json::json!({ "stopped": null }))?;
        } else {
            err(&format!(
                "sqlrs: no daemon runs in {}\n",
                ctx.home.dir.display()
            ));
        }
        return Ok(0);
    };
    let pid = daemon.info.pid;
    let client = Client::new(&daemon).map_err(DaemonError::Http)?;
    match client.shutdown().await {
        Ok(()) => {}
        // The daemon may close the connection as it goes; its pid tells the truth.
        Err(ClientError::Http { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if !ctx.home.wait_gone(pid, SHUTDOWN_WAIT).await {
        return Err(Error::Api(taidon_api::ApiError::new(
            taidon_api::ErrorKind::Internal,
            format!(
                "the daemon (pid {pid}) is still running {}s after it was asked to stop",
                SHUTDOWN_WAIT.as_secs()
            ),
        )));
    }
    if ctx.global.json {
        json_line(&serde_json::json!({ "stopped": pid }))?;
    } else {
        out(&format!("stopped daemon {pid}\n"))?;
    }
    Ok(0)
}

/// `pin` and `unpin`.
async fn pin(ctx: &Ctx, a: crate::args::PinArgs, on: bool) -> Result<i32, Error> {
    taidon_core::prefix::normalize(&a.id)?;
    let client = ctx.client().await?;
    let changed = if on {
        let reason = a.reason.unwrap_or(taidon_api::PinReason::Manual);
        client
            .pin(&taidon_api::PinRequest {
                state: a.id,
                reason,
                ref_name: a.ref_name.unwrap_or_default(),
            })
            .await?
    } else {
        client
            .unpin(&taidon_api::UnpinRequest {
                state: a.id,
                reason: a.reason,
                ref_name: a.ref_name,
            })
            .await?
    };
    if ctx.global.json {
        json_line(&changed)?;
    } else {
        let pins: Vec<String> = changed
            .pins
            .iter()
            .map(|p| {
                let name = if p.ref_name.is_empty() {
                    p.reason.to_string()
                } else {
                    format!("{}:{}", p.reason, p.ref_name)
                };
                format!("{name} ({})", if p.active { "pinned" } else { "released" })
            })
            .collect();
        out(&format!(
            "state {}: {}\n",
            changed.state_id.short(),
            if pins.is_empty() {
                "no pins".to_owned()
            } else {
                pins.join(", ")
            }
        ))?;
    }
    Ok(0)
}

/// `warmup`: builds or restores a state, with progress, and with `--hot` a standby.
async fn warmup(ctx: &Ctx, w: crate::args::Warmup) -> Result<i32, Error> {
    let inputs = match &w.psql {
        Some(psql) => Some(collect_inputs(psql)?),
        None => None,
    };
    let client = ctx.client().await?;
    let steps = match inputs {
        Some(inputs) => {
            send_inputs(&client, &inputs, &ctx.global).await?;
            inputs.steps
        }
        None => Vec::new(),
    };
    let req = taidon_api::WarmupRequest {
        state: w.id.clone(),
        steps,
        hot: w.hot,
        engine: Default::default(),
    };
    let events = client.warmup(&req).await?;
    let PrepareEvent::Done {
        state_id,
        cache_hit,
        ..
    } = follow(
        &client,
        events,
        &ctx.global,
        &std::env::current_dir().map_err(Error::Cwd)?,
    )
    .await?
    else {
        return Err(ClientError::StreamEnded.into());
    };
    if ctx.global.json {
        json_line(&serde_json::json!({
            "state_id": state_id,
            "cache_hit": cache_hit,
            "hot": w.hot,
        }))?;
    } else {
        out(&format!(
            "state {state_id} is {}\n",
            if w.hot {
                "HOT (a standby instance waits)"
            } else {
                "WARM"
            }
        ))?;
    }
    Ok(0)
}

/// `__complete WORDS...`: candidates for the last word, one per line. Ids come from a daemon
/// that already runs; completion never starts one, and a failure just offers nothing.
async fn complete(ctx: &Ctx, words: &[String]) -> Result<i32, Error> {
    let want = crate::complete::want(words);
    let crate::complete::Want::Ids {
        kind,
        prefix,
        home,
        also,
    } = &want
    else {
        out(&crate::complete::render(&want))?;
        return Ok(0);
    };
    let home = match home {
        Some(dir) => Home::new(std::path::absolute(dir).map_err(Error::Cwd)?)?,
        None => Home::new(ctx.home.dir.clone())?,
    };
    let mut states = Vec::new();
    let mut instances = Vec::new();
    if let Ok(Some(daemon)) = home.find().await {
        if let Ok(client) = Client::new(&daemon) {
            if let Ok(list) = client.states().await {
                states = list.iter().map(|s| s.state_id.to_string()).collect();
            }
            if let Ok(list) = client.instances().await {
                instances = list.iter().map(|i| i.instance_id.to_string()).collect();
            }
        }
    }
    let mut words = also.clone();
    words.extend(crate::complete::ids_for(*kind, prefix, &states, &instances));
    out(&crate::complete::render(&crate::complete::Want::Words(
        words,
    )))?;
    Ok(0)
}

/// `events`: the recorded lifecycle events, oldest first.
async fn events(ctx: &Ctx, id: Option<&str>) -> Result<i32, Error> {
    let client = ctx.client().await?;
    let list = client.events(id).await?;
    if ctx.global.json {
        json_line(&list)?;
        return Ok(0);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                render::age(e.ts_ms, now),
                e.kind.clone(),
                e.state_id
                    .map_or_else(|| "-".to_owned(), |s| s.short().to_string()),
                e.instance_id
                    .map_or_else(|| "-".to_owned(), |i| i.to_string()),
                e.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out(&render::table(
        &["WHEN", "EVENT", "STATE", "INSTANCE", "DETAIL"],
        &rows,
    ))?;
    Ok(0)
}
