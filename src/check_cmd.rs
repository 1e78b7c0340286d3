//! `sand check`: model-check the protocol with stateright.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sand_models::check::{check_with_progress, CheckOptions, Progress};
use sand_models::model::ModelCfg;
use sand_protocol::mutations::{Mutation, Mutations};
use stateright::{Expectation, Model};

/// How often a check whose stderr is not a terminal logs its progress.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Model-check the real GlobalQueue and LocalBus: every order of delivery, every crash and
/// recovery, every timer firing, within the fault budget. Prints the states explored and each
/// property's verdict; a counterexample comes with its trace.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Worker hosts in the model.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=4))]
    workers: u8,
    /// Grains in the chain.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=8))]
    chain: u8,
    /// Client requests.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    executions: u8,
    /// Use a fan-out with a join instead of a chain.
    #[arg(long)]
    fan_out: bool,
    /// Make a grain fail its first attempt, so retries are explored.
    #[arg(long)]
    grain_errors: bool,
    /// Worker crashes allowed, in all.
    #[arg(long, default_value_t = 1)]
    worker_crashes: u64,
    /// False suspicions allowed in all.
    #[arg(long, default_value_t = 1)]
    suspicions: u32,
    /// Gateway crashes allowed.
    #[arg(long, default_value_t = 0)]
    gateway_crashes: u32,
    /// Connection breaks (without a crash) allowed per worker life.
    #[arg(long, default_value_t = 0)]
    reconnects: u32,
    /// Worker w0 may die for good at any moment (needs at least 2 workers).
    #[arg(long)]
    worker_dies: bool,
    /// Firings of a worker's re-send timer allowed per worker life.
    #[arg(long, default_value_t = 0)]
    resends: u32,
    /// Attempts the gateway may give up on at their deadline, in all (grains get a timeout).
    #[arg(long, default_value_t = 0)]
    deadlines: u32,
    /// The client also deploys a second app and then removes it, each change once the one
    /// before is told durable.
    #[arg(long)]
    app_changes: bool,
    /// Look-ups of its executions the client may make while it waits, in all.
    #[arg(long, default_value_t = 0)]
    polls: u32,
    /// Progress messages a worker may have unacked at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    window: u8,
    /// Let the news of a gateway restart reach each worker and the client as a message, at
    /// any later moment, instead of in the restart's step: a bigger model, to cross-check
    /// that shortcut.
    #[arg(long)]
    restart_news_travels: bool,
    /// Switch on a deliberate protocol bug by name, to see the checker catch it (the names are
    /// in `protocol/src/mutations.rs`; an unknown name lists them all).
    #[arg(long)]
    mutation: Option<Mutation>,
    /// Stop exploring past this many steps.
    #[arg(long)]
    depth: Option<usize>,
    /// Stop after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Checker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Instead of checking, serve stateright's Explorer on this address (loopback, e.g.
    /// 127.0.0.1:3000) to walk the model in a browser.
    #[arg(long, value_name = "ADDR")]
    explore: Option<std::net::SocketAddr>,
}

impl CheckArgs {
    fn model_cfg(&self) -> ModelCfg {
        ModelCfg {
            workers: usize::from(self.workers),
            chain: usize::from(self.chain),
            executions: usize::from(self.executions),
            fan_out: self.fan_out,
            grain_errors: self.grain_errors,
            worker_crashes: self.worker_crashes,
            suspicions: self.suspicions,
            gateway_crashes: self.gateway_crashes,
            worker_dies: self.worker_dies,
            reconnects: self.reconnects,
            resends: self.resends,
            deadlines: self.deadlines,
            app_changes: self.app_changes,
            polls: self.polls,
            window: usize::from(self.window),
            fsync_each_batch: self.mutation == Some(Mutation::SplitHop),
            restart_news_travels: self.restart_news_travels,
            mutations: self.mutation.map_or(Mutations::NONE, Mutations::only),
        }
    }
}

/// Runs `sand check`.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.model_cfg();
    anyhow::ensure!(
        !cfg.worker_dies || cfg.workers >= 2,
        "--worker-dies needs --workers 2 or more: the last worker never dies for good"
    );
    if let Some(addr) = args.explore {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the Explorer has no authentication: serve it on a loopback address, not {addr}"
        );
        out!("serving the Explorer on http://{addr}/ (Ctrl-C to stop)");
        cfg.into_model()
            .checker()
            .threads(args.threads.max(1))
            .serve(addr);
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "model: {} workers, {}, {} execution(s); faults: {} worker crash(es), {} suspicion(s) \
         in all, {} gateway crash(es), {} reconnect(s) and {} re-send timer(s) per worker \
         life, {} deadline(s) in all, {} look-up(s){}{}{}{}",
        cfg.workers,
        if cfg.fan_out {
            "a fan-out of 2 with a join".to_string()
        } else {
            format!("a chain of {}", cfg.chain)
        },
        cfg.executions,
        cfg.worker_crashes,
        cfg.suspicions,
        cfg.gateway_crashes,
        cfg.reconnects,
        cfg.resends,
        cfg.deadlines,
        cfg.polls,
        if cfg.app_changes {
            "; a second app deployed and removed"
        } else {
            ""
        },
        if cfg.worker_dies {
            "; w0 may die for good"
        } else {
            ""
        },
        if cfg.restart_news_travels {
            "; restart news travels"
        } else {
            ""
        },
        args.mutation
            .map(|m| format!("; mutation: {m}"))
            .unwrap_or_default(),
    );
    let opts = CheckOptions {
        threads: args.threads,
        depth_max: args.depth,
        timeout: args.timeout.map(Duration::from_secs),
        stop_at_failure: args.mutation.is_some(),
    };
    let live = std::io::stderr().is_terminal();
    let mut logged = Duration::ZERO;
    let report = check_with_progress(cfg, &opts, |p: Progress| {
        if live && p.elapsed >= Duration::from_secs(1) {
            eprint!(
                "\r  {:>10} states, depth {:>3}, {:>5.0} s",
                p.unique_states,
                p.depth_max,
                p.elapsed.as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        } else if !live && p.elapsed >= logged + PROGRESS_LOG_EVERY {
            // Into a log: a line now and then, not a redrawn one.
            logged = p.elapsed;
            eprintln!(
                "  {} states, depth {}, {:.0} s",
                p.unique_states,
                p.depth_max,
                p.elapsed.as_secs_f64()
            );
        }
    });
    if live {
        eprintln!();
    }
    out!(
        "explored {} unique states ({} in all), depth {}, in {:.1} s{}",
        report.unique_states,
        report.states,
        report.depth_max,
        report.elapsed.as_secs_f64(),
        if report.complete {
            ""
        } else {
            " (stopped early: verdicts hold only for what was explored)"
        }
    );
    for v in &report.verdicts {
        let kind = match v.expectation {
            Expectation::Always => "safety",
            Expectation::Eventually => "liveness",
            Expectation::Sometimes => "reached",
        };
        let verdict = match (&v.expectation, v.holds, v.conclusive) {
            (Expectation::Sometimes, true, _) => "yes",
            (Expectation::Sometimes, false, true) => "NEVER",
            (Expectation::Sometimes, false, false) => "not yet",
            (_, true, _) => "holds",
            (_, false, true) => "VIOLATED",
            (_, false, false) => "unknown",
        };
        out!("  {kind:<8} {verdict:<8} {}", v.property);
    }
    let failures: Vec<_> = report.failures().collect();
    for v in &failures {
        if let Some(trace) = &v.trace {
            out!("\ncounterexample to \"{}\":\n{trace}", v.property);
        }
    }
    std::io::stdout().flush().context("writing the report")?;
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
