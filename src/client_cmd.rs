//! `sand deploy`, `sand invoke`, `sand status` and `sand logs`: clients of the HTTP API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

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
    /// The API's bearer token, if the gateway wants one.
    #[arg(long, env = "SAND_TOKEN", global = true)]
    token: Option<String>,
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

/// `sand status` and `sand logs`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The execution id (without it, `status` lists the workers and apps).
    exec: Option<String>,
    #[command(flatten)]
    target: Target,
}

/// What a deployment reported.
#[derive(Debug)]
pub struct Deployed {
    /// The app.
    pub app: String,
    /// How many grains it has.
    pub grains: usize,
    /// Its entry grain.
    pub entry: String,
}

/// A client of one gateway's API.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`).
    pub fn new(base: String, token: Option<String>) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(330))
            .build();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent,
        }
    }

    fn from(target: Target) -> Self {
        Self::new(target.gateway, target.token)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Sends a request; returns the status and the JSON body, or says why there is none.
    fn call(&self, req: ureq::Request, body: Option<&[u8]>) -> Result<(u16, Value)> {
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
        let value = serde_json::from_str(&text)
            .with_context(|| format!("{url} answered {status} with non-JSON: {text:.200}"))?;
        Ok((status, value))
    }

    /// Packs and deploys the app in `dir`.
    pub fn deploy(&self, dir: &Path) -> Result<Deployed> {
        let manifest = sand_app::Manifest::load(dir)?;
        let bundle = sand_app::pack(dir)?;
        let req = self
            .request("PUT", &format!("/v1/apps/{}", manifest.name))
            .set("Content-Type", "application/gzip");
        let (status, body) = self.call(req, Some(&bundle))?;
        if status != 200 {
            bail!("deploy refused ({status}): {}", error_text(&body));
        }
        Ok(Deployed {
            app: manifest.name.to_string(),
            grains: body["grains"].as_array().map_or(0, Vec::len),
            entry: body["entry"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

fn error_text(body: &Value) -> String {
    match body["error"]["message"].as_str() {
        Some(m) => m.to_owned(),
        None => body.to_string(),
    }
}

/// `sand deploy DIR`.
pub fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let d = Client::from(args.target).deploy(&args.dir)?;
    out!("deployed {}: {} grains, entry {}", d.app, d.grains, d.entry);
    Ok(ExitCode::SUCCESS)
}

/// `sand invoke APP [JSON]`: prints the answer; exits 1 if the execution failed.
pub fn invoke(args: InvokeArgs) -> Result<ExitCode> {
    let input = args.input.unwrap_or_else(|| "null".into());
    serde_json::from_str::<Value>(&input)
        .map_err(|e| anyhow!("the input is not JSON ({e}): {input}"))?;
    let client = Client::from(args.target);
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
    let (status, body) = client.call(req, Some(input.as_bytes()))?;
    match status {
        200 if body.get("error").is_some() => {
            out!("{}", serde_json::to_string_pretty(&body)?);
            Ok(ExitCode::from(1))
        }
        200 => {
            out!("{}", body["output"]);
            Ok(ExitCode::SUCCESS)
        }
        202 => {
            out!("{}", body["execution"].as_str().unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("invoke refused ({status}): {}", error_text(&body)),
    }
}

/// `sand status [EXEC]`.
pub fn status(args: ExecArgs) -> Result<ExitCode> {
    let client = Client::from(args.target);
    let paths = match &args.exec {
        Some(exec) => vec![format!("/v1/executions/{exec}")],
        None => vec!["/v1/workers".to_owned(), "/v1/apps".to_owned()],
    };
    for path in paths {
        let (status, body) = client.call(client.request("GET", &path), None)?;
        if status != 200 {
            bail!("{path}: {status}: {}", error_text(&body));
        }
        let mut body = body;
        if let Some(calls) = body.get_mut("calls").and_then(Value::as_array_mut) {
            for c in calls {
                if let Some(obj) = c.as_object_mut() {
                    obj.remove("stdout");
                    obj.remove("stderr");
                }
            }
        }
        out!("{}", serde_json::to_string_pretty(&body)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `sand logs EXEC`: the execution's calls, one block each, with what they printed.
pub fn logs(args: ExecArgs) -> Result<ExitCode> {
    let exec = args
        .exec
        .ok_or_else(|| anyhow!("which execution? `sand logs EXEC_ID`"))?;
    let client = Client::from(args.target);
    let (status, body) = client.call(
        client.request("GET", &format!("/v1/executions/{exec}")),
        None,
    )?;
    if status != 200 {
        bail!("{status}: {}", error_text(&body));
    }
    out!(
        "execution {exec} ({}): {}",
        body["app"].as_str().unwrap_or("?"),
        body["status"].as_str().unwrap_or("?")
    );
    let calls = body["calls"].as_array().cloned().unwrap_or_default();
    let t0 = calls
        .iter()
        .filter_map(|c| c["dispatched_ms"].as_u64().or(c["started_ms"].as_u64()))
        .min()
        .unwrap_or(0);
    for c in &calls {
        let at = |k: &str| {
            c[k].as_u64()
                .map_or("-".to_owned(), |t| format!("+{}ms", t.saturating_sub(t0)))
        };
        out!(
            "\n{} attempt {:x} on worker {} via {}{}: started {} ended {}{}",
            c["grain"].as_str().unwrap_or("?"),
            c["attempt"].as_u64().unwrap_or(0),
            c["worker"],
            c["via"].as_str().unwrap_or("?"),
            if c["recovery"].as_bool() == Some(true) {
                " (recovery)"
            } else {
                ""
            },
            at("started_ms"),
            at("ended_ms"),
            match c["error"].as_object() {
                Some(e) => format!(
                    ", failed: {}",
                    e.get("message").and_then(Value::as_str).unwrap_or("?")
                ),
                None => String::new(),
            },
        );
        for stream in ["stdout", "stderr"] {
            let text = c[stream].as_str().unwrap_or_default();
            if !text.is_empty() {
                out!("  {stream}:");
                for line in text.lines() {
                    out!("    {line}");
                }
            }
        }
    }
    if let Some(out) = body.get("output") {
        out!("\noutput: {out}");
    }
    if let Some(err) = body.get("error") {
        out!("\nerror: {err}");
    }
    Ok(ExitCode::SUCCESS)
}
