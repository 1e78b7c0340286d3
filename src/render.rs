//! How the client commands show the API's answers to a person: aligned tables and one block per
//! call. What an app produced (grain names excepted, which the manifest checks) passes through
//! [`printable`] first.

use std::fmt::Write as _;

use sand_api::{App, CallTrace, Execution, ExecutionSummary, Status, Worker};
use sand_protocol::wire::GrainError;

/// `sand status`: the workers, the apps, then the latest executions, newest first.
pub fn cluster(workers: &[Worker], apps: &[App], latest: &[ExecutionSummary]) -> String {
    let workers: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let state = match (w.connected, w.dead) {
                (_, true) => "dead",
                (true, _) => "connected",
                _ => "disconnected",
            };
            vec![
                format!("w{}", w.id),
                w.incarnation.to_string(),
                state.to_owned(),
                w.load.to_string(),
            ]
        })
        .collect();
    let apps: Vec<Vec<String>> = apps
        .iter()
        .map(|a| {
            vec![
                printable(&a.app),
                printable(&a.entry),
                printable(&a.grains.join(" ")),
                printable(&a.digest.chars().take(12).collect::<String>()),
            ]
        })
        .collect();
    let latest: Vec<Vec<String>> = latest
        .iter()
        .map(|e| {
            let took = e.ended_ms.map_or("-".to_owned(), |end| {
                format!("{}ms", end.saturating_sub(e.accepted_ms))
            });
            vec![
                printable(&e.execution),
                printable(&e.app),
                e.status.as_str().to_owned(),
                e.calls.to_string(),
                took,
            ]
        })
        .collect();
    let mut out = table(&["WORKER", "INCARNATION", "STATE", "CALLS"], &workers);
    out.push('\n');
    out.push_str(&table(&["APP", "ENTRY", "GRAINS", "DIGEST"], &apps));
    out.push('\n');
    out.push_str(&table(
        &["EXECUTION", "APP", "STATUS", "CALLS", "TOOK"],
        &latest,
    ));
    out
}

/// `sand status EXEC`: what the execution is and how it ended, then one row per call, in the
/// order the API gives them (dispatch or start time), times from the first.
pub fn execution(body: &Execution) -> String {
    let t0 = origin(&body.calls);
    let rows: Vec<Vec<String>> = body
        .calls
        .iter()
        .map(|c| {
            let mut note = Vec::new();
            if c.recovery {
                note.push("recovery".to_owned());
            }
            if let Some(e) = &c.error {
                let first = e.message.lines().next().unwrap_or_default();
                note.push(format!("failed: {}", clip(&printable(first), 60)));
            }
            vec![
                printable(&c.grain),
                c.attempt.to_string(),
                format!("w{}", c.worker),
                c.via.as_str().to_owned(),
                at(c.started_ms, t0),
                at(c.ended_ms, t0),
                note.join(", "),
            ]
        })
        .collect();
    let mut out = format!(
        "execution {}\n{}\n\n",
        printable(&body.execution),
        summary(body)
    );
    out.push_str(&table(
        &[
            "GRAIN", "ATTEMPT", "WORKER", "VIA", "STARTED", "ENDED", "NOTE",
        ],
        &rows,
    ));
    out.push_str(&outcome(body));
    out
}

/// `app: status`, the first line of every view of an execution.
pub fn summary(body: &Execution) -> String {
    format!("{}: {}", printable(&body.app), body.status.as_str())
}

/// When the first call was dispatched or started (ms since the Unix epoch): the zero of the
/// times shown.
pub fn origin(calls: &[CallTrace]) -> u64 {
    calls
        .iter()
        .filter_map(|c| c.dispatched_ms.or(c.started_ms))
        .min()
        .unwrap_or(0)
}

/// Whether a call has ended, by its trace.
pub fn ended(call: &CallTrace) -> bool {
    call.ended_ms.is_some() || call.error.is_some()
}

/// `sand logs`: one call, with what it printed.
pub fn call_block(c: &CallTrace, t0: u64) -> String {
    let mut out = format!(
        "\n{} attempt {} on worker {} via {}{}: started {} ended {}",
        printable(&c.grain),
        c.attempt,
        c.worker,
        c.via.as_str(),
        if c.recovery { " (recovery)" } else { "" },
        at(c.started_ms, t0),
        at(c.ended_ms, t0),
    );
    if let Some(e) = &c.error {
        let _ = write!(out, ", failed: {}", printable(&e.message));
    }
    out.push('\n');
    for (stream, printed) in [("stdout", &c.stdout), ("stderr", &c.stderr)] {
        if !printed.is_empty() {
            let _ = writeln!(out, "  {stream}:");
            for line in printed.lines() {
                let _ = writeln!(out, "    {}", printable(line));
            }
        }
    }
    out
}

/// The execution's output or error, if it ended: `\noutput: …` or `\nerror: …`.
pub fn outcome(body: &Execution) -> String {
    // JSON escapes C0 controls in strings, but not DEL or C1 ones.
    match body.status {
        Status::Running => String::new(),
        Status::Succeeded => {
            let output = body.output.clone().unwrap_or_default();
            format!("\noutput: {}\n", printable(&output.to_string()))
        }
        Status::Failed => {
            let error = body.error.as_ref().map(error_json).unwrap_or_default();
            format!("\nerror: {}\n", printable(&error))
        }
    }
}

/// A grain's error as JSON, as the API gives it.
fn error_json(e: &GrainError) -> String {
    serde_json::to_string(e).unwrap_or_default()
}

/// `text` (what an app wrote) made safe for a terminal: control characters, which could move
/// the cursor, rewrite earlier lines or set the window title, are shown as escapes (`\x1b`,
/// `\u{9b}`); tab and newline stay.
pub fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' | '\n' => shown.push(c),
            c if c.is_ascii_control() => shown.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => shown.extend(c.escape_unicode()),
            c => shown.push(c),
        }
    }
    shown
}

/// `+Nms` from `t0`, or `-` if the call has no such time yet.
fn at(t: Option<u64>, t0: u64) -> String {
    t.map_or("-".to_owned(), |t| format!("+{}ms", t.saturating_sub(t0)))
}

/// `s` cut to `max` characters, with `…` if it was longer.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// Rows under a header, columns padded to their widest cell, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn call(grain: &str, started: u64, recovery: bool, error: Option<&str>) -> Value {
        json!({
            "call": "00000000000000aa", "grain": grain, "attempt": 4_294_967_296u64,
            "worker": 2, "via": "local", "reason": "local", "recovery": recovery,
            "dispatched_ms": null, "started_ms": started, "ended_ms": started + 3,
            "error": error.map(|m| json!({"kind": "raised", "message": m})),
            "stdout": "", "stderr": "",
        })
    }

    #[test]
    fn an_execution_reads_as_a_summary_a_table_and_its_outcome() {
        let body = json!({
            "execution": "e", "app": "pipeline", "status": "succeeded", "output": 49,
            "calls": [call("double", 1000, false, None), call("square", 1010, true, None)],
        });
        let shown = execution(&serde_json::from_value(body).unwrap());
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[0], "execution e");
        assert_eq!(lines[1], "pipeline: succeeded");
        assert_eq!(
            lines[3],
            "GRAIN   ATTEMPT     WORKER  VIA    STARTED  ENDED  NOTE"
        );
        assert_eq!(lines[4], "double  4294967296  w2      local  +0ms     +3ms");
        assert_eq!(
            lines[5],
            "square  4294967296  w2      local  +10ms    +13ms  recovery"
        );
        assert_eq!(lines.last(), Some(&"output: 49"));
    }

    #[test]
    fn what_an_app_wrote_cannot_drive_the_terminal_from_a_table() {
        let evil = "boom\x1b[2J\u{9b}31m and then some more words to be cut off at sixty chars";
        let body = json!({
            "execution": "e", "app": "a", "status": "failed",
            "error": {"kind": "raised", "message": evil},
            "calls": [call("g", 5, false, Some(evil))],
        });
        let shown = execution(&serde_json::from_value(body.clone()).unwrap());
        assert!(
            !shown.contains('\x1b') && !shown.contains('\u{9b}'),
            "{shown:?}"
        );
        assert!(shown.contains("failed: boom\\x1b[2J\\u{9b}31m"), "{shown}");
        assert!(
            shown.contains('…'),
            "a long message is clipped in the table: {shown}"
        );
        let block = call_block(
            &serde_json::from_value(body["calls"][0].clone()).unwrap(),
            5,
        );
        assert!(!block.contains('\x1b'), "{block:?}");
    }

    #[test]
    fn an_apps_output_cannot_drive_the_terminal() {
        // Clear the screen, set the window title, a C1 CSI, a carriage return over the line.
        let hostile = "ok\x1b[2J\x1b]0;pwned\x07\u{9b}31m\rfake\tcol\\x1b\n";
        assert_eq!(
            printable(hostile),
            "ok\\x1b[2J\\x1b]0;pwned\\x07\\u{9b}31m\\x0dfake\tcol\\x1b\n"
        );
        assert_eq!(printable("plain text, ünïcödé"), "plain text, ünïcödé");
    }

    #[test]
    fn the_cluster_reads_as_three_tables() {
        let workers = json!([
            {"id": 1, "incarnation": 3, "connected": true, "dead": false, "load": 2},
            {"id": 2, "incarnation": 1, "connected": false, "dead": true, "load": 0},
        ]);
        let apps = json!([
            {"app": "fanout", "entry": "split", "grains": ["split", "measure", "total"],
             "digest": "0123456789abcdef0123"},
        ]);
        let latest = json!([
            {"execution": "e2", "app": "fanout", "status": "running", "accepted_ms": 5000,
             "ended_ms": null, "calls": 2},
            {"execution": "e1", "app": "fanout", "status": "succeeded", "accepted_ms": 1000,
             "ended_ms": 1012, "calls": 5},
        ]);
        let shown = cluster(
            &serde_json::from_value::<Vec<Worker>>(workers).unwrap(),
            &serde_json::from_value::<Vec<App>>(apps).unwrap(),
            &serde_json::from_value::<Vec<ExecutionSummary>>(latest).unwrap(),
        );
        assert_eq!(
            shown,
            "WORKER  INCARNATION  STATE      CALLS\n\
             w1      3            connected  2\n\
             w2      1            dead       0\n\
             \n\
             APP     ENTRY  GRAINS               DIGEST\n\
             fanout  split  split measure total  0123456789ab\n\
             \n\
             EXECUTION  APP     STATUS     CALLS  TOOK\n\
             e2         fanout  running    2      -\n\
             e1         fanout  succeeded  5      12ms\n"
        );
    }

    #[test]
    fn a_call_has_ended_once_it_has_an_end_time_or_an_error() {
        let typed = |v: Value| -> CallTrace { serde_json::from_value(v).unwrap() };
        assert!(ended(&typed(call("g", 1, false, None))));
        let mut running = call("g", 1, false, None);
        running["ended_ms"] = Value::Null;
        assert!(!ended(&typed(running.clone())));
        running["error"] = json!({"kind": "crashed", "message": "x"});
        assert!(ended(&typed(running)));
    }
}
