//! `sand deploy`, `sand invoke`, `sand status` and `sand logs`: clients of the HTTP API.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use sand_api::{Accepted, Answer, App, Apps, ErrorBody, Execution, Executions, Status, Workers};
use sand_gateway::token::Token;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::render;

/// Where the API is, for every client command.
#[derive(Args, Debug)]
pub struct Target {
    /// The gateway's HTTP address.
    #[arg(
        long,
        env = "SAND_GATEWAY",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    gateway: String,
    /// The file (mode 0600) with the API's bearer token. Without it: SAND_TOKEN; without
    /// that, for a gateway on this machine, `.sand/token` (the one `sand dev` makes) if it
    /// exists.
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[arg(long = "token", hide = true, global = true, value_parser = refuse_token_on_argv)]
    _token: Option<String>,
    /// For an `https://` gateway: trust only this CA certificate (PEM), such as the cluster's
    /// `ca.crt`, instead of the system's roots.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
}

/// Where `sand dev` keeps its token by default, which the CLI reads for a gateway on this
/// machine.
const DEV_TOKEN_FILE: &str = ".sand/token";

/// The `--token` a command line may not carry: every local user reads argv in `ps`.
pub fn refuse_token_on_argv(_: &str) -> Result<String, String> {
    Err(
        "a token on the command line is visible to every user of this machine (ps); put it in \
         a file only you can read (--token-file FILE) or in SAND_TOKEN"
            .into(),
    )
}

/// The token an operator gave: the one in `file`, or else the one in SAND_TOKEN, if any.
pub fn operator_token(file: Option<&Path>) -> Result<Option<Token>> {
    if let Some(file) = file {
        return Ok(Some(Token::read(file)?));
    }
    match std::env::var("SAND_TOKEN") {
        Ok(text) => Ok(Some(Token::new(&text, "in SAND_TOKEN")?)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("SAND_TOKEN is not valid text"),
    }
}

/// Whether the API at `base` (`http[s]://host[:port][/...]`) is on this machine.
fn is_loopback(base: &str) -> bool {
    let authority = base.split_once("://").map_or(base, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `sand deploy`.
#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The app directory (with its sand.toml).
    dir: PathBuf,
    #[command(flatten)]
    target: Target,
}

/// `sand invoke`.
#[derive(Args, Debug)]
pub struct InvokeArgs {
    /// The app.
    app: String,
    /// The entry grain's input, as JSON (default `null`).
    input: Option<String>,
    /// Answer with the execution id at once instead of waiting for the result.
    #[arg(long = "async")]
    asynchronous: bool,
    /// Wait at most this many seconds for the result.
    #[arg(long, default_value_t = 30)]
    wait: u64,
    /// Make a retried request return the first execution.
    #[arg(long)]
    idempotency_key: Option<String>,
    #[command(flatten)]
    target: Target,
}

/// `sand status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The execution id; without it, the cluster's workers and apps and the latest executions.
    exec: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Show the execution again as it changes, until it ends.
    #[arg(long, requires = "exec")]
    watch: bool,
    #[command(flatten)]
    target: Target,
}

/// `sand logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The execution id.
    exec: String,
    /// Print each call as it ends, until the execution ends.
    #[arg(long, short = 'f')]
    follow: bool,
    #[command(flatten)]
    target: Target,
}

/// The executions `sand status` lists.
const LATEST: usize = 10;

/// How often `--watch` and `--follow` look again.
const LOOK_AGAIN_EVERY: Duration = Duration::from_millis(500);

/// A client of one gateway's API.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<Token>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the API at `base` (`http[s]://host:port`), sending `token` if given and
    /// trusting only the CA certificate in `ca` (PEM) for `https`, if given.
    pub fn new(base: String, token: Option<Token>, ca: Option<&Path>) -> Result<Self> {
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(330));
        if let Some(ca) = ca {
            agent = agent.tls_config(trusting(ca)?);
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent: agent.build(),
        })
    }

    fn from(target: Target) -> Result<Self> {
        let token = match operator_token(target.token_file.as_deref())? {
            Some(token) => Some(token),
            // The dev token goes only to a gateway on this machine: never to one named by a
            // mistyped or hostile --gateway.
            None if is_loopback(&target.gateway) && Path::new(DEV_TOKEN_FILE).exists() => {
                Some(Token::read(Path::new(DEV_TOKEN_FILE))?)
            }
            None => None,
        };
        Self::new(target.gateway, token, target.ca.as_deref())
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {}", t.expose())),
            None => req,
        }
    }

    /// `GET path`, which must answer 200 with a `T`.
    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let answer = self.call(self.request("GET", path), None)?;
        if answer.status != 200 {
            return Err(answer.refused(path));
        }
        answer.parse()
    }

    /// Sends a request; returns its answer, or says why there is none.
    fn call(&self, req: ureq::Request, body: Option<&[u8]>) -> Result<Answered> {
        let url = req.url().to_owned();
        let sent = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let response = match sent {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => bail!("cannot reach the gateway at {url}: {e}"),
        };
        let status = response.status();
        let text = response
            .into_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        Ok(Answered { url, status, text })
    }

    /// Packs and deploys the app in `dir`.
    pub fn deploy(&self, dir: &Path) -> Result<App> {
        let manifest = sand_app::Manifest::load(dir)?;
        let bundle = sand_app::pack(dir)?;
        let req = self
            .request("PUT", &format!("/v1/apps/{}", manifest.name))
            .set("Content-Type", "application/gzip");
        let answer = self.call(req, Some(&bundle))?;
        if answer.status != 200 {
            return Err(answer.refused("deploy refused"));
        }
        answer.parse()
    }
}

/// An answer of the API, not yet read as any type.
struct Answered {
    url: String,
    status: u16,
    text: String,
}

impl Answered {
    /// The body as the API's `T`.
    fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.text).with_context(|| {
            format!(
                "{} answered {} with something else than this client knows: {:.200}",
                self.url, self.status, self.text
            )
        })
    }

    /// The API's refusal of `what`, said: its message, or the body if it is not an error.
    fn refused(&self, what: &str) -> anyhow::Error {
        match serde_json::from_str::<ErrorBody>(&self.text) {
            Ok(e) => anyhow!("{what} ({}): {}", self.status, e.error.message),
            Err(_) => anyhow!("{what} ({}): {:.200}", self.status, self.text),
        }
    }
}

/// A TLS client configuration that trusts only the CA certificates in `ca` (PEM).
fn trusting(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("{} is not PEM certificates", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("cannot trust {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS version in common with rustls")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `sand deploy DIR`.
pub fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let d = Client::from(args.target)?.deploy(&args.dir)?;
    out!(
        "deployed {}: {} grains, entry {}",
        d.app,
        d.grains.len(),
        d.entry
    );
    Ok(ExitCode::SUCCESS)
}

/// `sand invoke APP [JSON]`: prints the answer; exits 1 if the execution failed.
pub fn invoke(args: InvokeArgs) -> Result<ExitCode> {
    let input = args.input.unwrap_or_else(|| "null".into());
    serde_json::from_str::<Value>(&input)
        .map_err(|e| anyhow!("the input is not JSON ({e}): {input}"))?;
    let client = Client::from(args.target)?;
    let query = if args.asynchronous {
        "?async=true".to_owned()
    } else {
        format!("?wait={}", args.wait)
    };
    let mut req = client
        .request("POST", &format!("/v1/apps/{}/invoke{query}", args.app))
        .set("Content-Type", "application/json");
    if let Some(key) = &args.idempotency_key {
        req = req.set("Idempotency-Key", key);
    }
    let answer = client.call(req, Some(input.as_bytes()))?;
    match answer.status {
        200 => {
            let body: Answer = answer.parse()?;
            if body.status == Status::Succeeded {
                out!("{}", body.output.unwrap_or_default());
                Ok(ExitCode::SUCCESS)
            } else {
                out!("{}", serde_json::to_string_pretty(&body)?);
                Ok(ExitCode::from(1))
            }
        }
        202 => {
            out!("{}", answer.parse::<Accepted>()?.execution);
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(answer.refused("invoke refused")),
    }
}

/// `sand status [EXEC]`.
pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let client = Client::from(args.target)?;
    let Some(exec) = args.exec else {
        let workers: Workers = client.get("/v1/workers")?;
        let apps: Apps = client.get("/v1/apps")?;
        let latest: Executions = client.get(&format!("/v1/executions?limit={LATEST}"))?;
        if args.json {
            // One document, so a script can read it whole.
            let cluster = serde_json::json!({
                "workers": workers.workers,
                "apps": apps.apps,
                "executions": latest.executions,
            });
            out!("{}", serde_json::to_string_pretty(&cluster)?);
        } else {
            let tables = render::cluster(&workers.workers, &apps.apps, &latest.executions);
            out!("{}", tables.trim_end());
        }
        return Ok(ExitCode::SUCCESS);
    };
    let path = format!("/v1/executions/{exec}");
    let clear = args.watch && std::io::stdout().is_terminal();
    let mut shown = String::new();
    loop {
        let body: Execution = client.get(&path)?;
        let view = if args.json {
            let mut body = serde_json::to_value(&body)?;
            for c in body["calls"].as_array_mut().into_iter().flatten() {
                if let Some(obj) = c.as_object_mut() {
                    obj.remove("stdout");
                    obj.remove("stderr");
                }
            }
            serde_json::to_string_pretty(&body)?
        } else {
            render::execution(&body).trim_end().to_owned()
        };
        // Watching, a view is shown again only when it changed; on a terminal, in place.
        if view != shown {
            if clear {
                out!("\x1b[H\x1b[2J{view}");
            } else {
                out!("{view}");
            }
            shown = view;
        }
        if !args.watch || body.status != Status::Running {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(LOOK_AGAIN_EVERY);
    }
}

/// `sand logs EXEC [--follow]`: the execution's calls, one block each, with what they printed;
/// following, each call once it has ended, until the execution ends.
pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    let client = Client::from(args.target)?;
    let exec = args.exec;
    let path = format!("/v1/executions/{exec}");
    let body: Execution = client.get(&path)?;
    out!("execution {exec} ({})", render::summary(&body));
    if !args.follow {
        let t0 = render::origin(&body.calls);
        for c in &body.calls {
            out!("{}", render::call_block(c, t0).trim_end());
        }
        out!("{}", render::outcome(&body).trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let mut printed = std::collections::HashSet::new();
    let mut t0 = None;
    let mut body = body;
    loop {
        let running = body.status == Status::Running;
        let zero = *t0.get_or_insert_with(|| render::origin(&body.calls));
        // Once the execution has ended, its traces may still be on their way: wait a moment
        // for the last ones, then print what there is.
        for c in body.calls.iter().filter(|c| render::ended(c) || !running) {
            if printed.insert((c.call.clone(), c.attempt)) {
                out!("{}", render::call_block(c, zero).trim_end());
            }
        }
        if !running {
            out!("\n{}", render::summary(&body));
            out!("{}", render::outcome(&body).trim_end());
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(LOOK_AGAIN_EVERY);
        body = client.get(&path)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gateway_on_this_machine_gets_the_dev_token() {
        for local in [
            "http://127.0.0.1:8080",
            "https://localhost/v1",
            "http://[::1]:80",
            "127.0.0.2:1",
        ] {
            assert!(is_loopback(local), "{local}");
        }
        for remote in [
            "http://10.0.0.1:8080",
            "https://localhost.evil.example",
            "http://[2001:db8::1]:80",
        ] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }
}
