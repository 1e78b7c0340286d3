//! How the client commands show the API's answers to a person: aligned tables and one block per
//! call. What an app produced (grain names excepted, which the manifest checks) passes through
//! [`printable`] first.

use std::fmt::Write as _;

use serde_json::Value;

/// `sand status`: the workers, then the apps.
pub fn cluster(workers: &Value, apps: &Value) -> String {
    let rows = |v: &Value, key: &str| v[key].as_array().cloned().unwrap_or_default();
    let workers: Vec<Vec<String>> = rows(workers, "workers")
        .iter()
        .map(|w| {
            let state = match (w["connected"].as_bool(), w["dead"].as_bool()) {
                (_, Some(true)) => "dead",
                (Some(true), _) => "connected",
                _ => "disconnected",
            };
            vec![
                format!("w{}", w["id"]),
                w["incarnation"].to_string(),
                state.to_owned(),
                w["load"].to_string(),
            ]
        })
        .collect();
    let apps: Vec<Vec<String>> = rows(apps, "apps")
        .iter()
        .map(|a| {
            let grains: Vec<&str> = a["grains"]
                .as_array()
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let digest = a["digest"].as_str().unwrap_or("?");
            vec![
                text(&a["app"]),
                text(&a["entry"]),
                grains.join(" "),
                digest.chars().take(12).collect(),
            ]
        })
        .collect();
    let mut out = table(&["WORKER", "INCARNATION", "STATE", "CALLS"], &workers);
    out.push('\n');
    out.push_str(&table(&["APP", "ENTRY", "GRAINS", "DIGEST"], &apps));
    out
}

/// `sand status EXEC`: what the execution is and how it ended, then one row per call, in the
/// order the API gives them (dispatch or start time), times from the first.
pub fn execution(id: &str, body: &Value) -> String {
    let calls = calls(body);
    let t0 = origin(&calls);
    let rows: Vec<Vec<String>> = calls
        .iter()
        .map(|c| {
            let mut note = Vec::new();
            if c["recovery"].as_bool() == Some(true) {
                note.push("recovery".to_owned());
            }
            if let Some(e) = c["error"].as_object() {
                let message = e.get("message").and_then(Value::as_str).unwrap_or("?");
                let first = message.lines().next().unwrap_or_default();
                note.push(format!("failed: {}", clip(&printable(first), 60)));
            }
            vec![
                text(&c["grain"]),
                format!("{:x}", c["attempt"].as_u64().unwrap_or(0)),
                format!("w{}", c["worker"]),
                text(&c["via"]),
                at(c, "started_ms", t0),
                at(c, "ended_ms", t0),
                note.join(", "),
            ]
        })
        .collect();
    let mut out = format!("execution {id}\n{}\n\n", summary(body));
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
pub fn summary(body: &Value) -> String {
    format!("{}: {}", text(&body["app"]), text(&body["status"]))
}

/// The execution's calls as the API lists them.
pub fn calls(body: &Value) -> Vec<Value> {
    body["calls"].as_array().cloned().unwrap_or_default()
}

/// When the first call was dispatched or started (ms since the Unix epoch): the zero of the
/// times shown.
pub fn origin(calls: &[Value]) -> u64 {
    calls
        .iter()
        .filter_map(|c| c["dispatched_ms"].as_u64().or(c["started_ms"].as_u64()))
        .min()
        .unwrap_or(0)
}

/// Whether a call has ended, by its trace.
pub fn ended(call: &Value) -> bool {
    call["ended_ms"].is_u64() || call["error"].is_object()
}

/// `sand logs`: one call, with what it printed.
pub fn call_block(c: &Value, t0: u64) -> String {
    let mut out = format!(
        "\n{} attempt {:x} on worker {} via {}{}: started {} ended {}",
        text(&c["grain"]),
        c["attempt"].as_u64().unwrap_or(0),
        c["worker"],
        text(&c["via"]),
        if c["recovery"].as_bool() == Some(true) {
            " (recovery)"
        } else {
            ""
        },
        at(c, "started_ms", t0),
        at(c, "ended_ms", t0),
    );
    if let Some(e) = c["error"].as_object() {
        let message = e.get("message").and_then(Value::as_str).unwrap_or("?");
        let _ = write!(out, ", failed: {}", printable(message));
    }
    out.push('\n');
    for stream in ["stdout", "stderr"] {
        let printed = c[stream].as_str().unwrap_or_default();
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
pub fn outcome(body: &Value) -> String {
    // JSON escapes C0 controls in strings, but not DEL or C1 ones.
    match (body.get("output"), body.get("error")) {
        (Some(output), _) => format!("\noutput: {}\n", printable(&output.to_string())),
        (None, Some(error)) => format!("\nerror: {}\n", printable(&error.to_string())),
        (None, None) => String::new(),
    }
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

/// A string field as shown: printable, `?` if absent.
fn text(v: &Value) -> String {
    printable(v.as_str().unwrap_or("?"))
}

/// `+Nms` from `t0`, or `-` if the call has no such time yet.
fn at(call: &Value, key: &str, t0: u64) -> String {
    call[key]
        .as_u64()
        .map_or("-".to_owned(), |t| format!("+{}ms", t.saturating_sub(t0)))
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
mod tests {
    use super::*;
    use serde_json::json;

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
        let shown = execution("e", &body);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines[0], "execution e");
        assert_eq!(lines[1], "pipeline: succeeded");
        assert_eq!(
            lines[3],
            "GRAIN   ATTEMPT    WORKER  VIA    STARTED  ENDED  NOTE"
        );
        assert_eq!(lines[4], "double  100000000  w2      local  +0ms     +3ms");
        assert_eq!(
            lines[5],
            "square  100000000  w2      local  +10ms    +13ms  recovery"
        );
        assert_eq!(lines.last(), Some(&"output: 49"));
    }

    #[test]
    fn what_an_app_wrote_cannot_drive_the_terminal_from_a_table() {
        let evil = "boom\x1b[2J\u{9b}31m and then some more words to be cut off at sixty chars";
        let body = json!({
            "app": "a", "status": "failed",
            "error": {"kind": "raised", "message": evil},
            "calls": [call("g", 5, false, Some(evil))],
        });
        let shown = execution("e", &body);
        assert!(
            !shown.contains('\x1b') && !shown.contains('\u{9b}'),
            "{shown:?}"
        );
        assert!(shown.contains("failed: boom\\x1b[2J\\u{9b}31m"), "{shown}");
        assert!(
            shown.contains('…'),
            "a long message is clipped in the table: {shown}"
        );
        let block = call_block(&body["calls"][0], 5);
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
    fn the_cluster_reads_as_two_tables() {
        let workers = json!({"workers": [
            {"id": 1, "incarnation": 3, "connected": true, "dead": false, "load": 2},
            {"id": 2, "incarnation": 1, "connected": false, "dead": true, "load": 0},
        ]});
        let apps = json!({"apps": [
            {"app": "fanout", "entry": "split", "grains": ["split", "measure", "total"],
             "digest": "0123456789abcdef0123"},
        ]});
        let shown = cluster(&workers, &apps);
        assert_eq!(
            shown,
            "WORKER  INCARNATION  STATE      CALLS\n\
             w1      3            connected  2\n\
             w2      1            dead       0\n\
             \n\
             APP     ENTRY  GRAINS               DIGEST\n\
             fanout  split  split measure total  0123456789ab\n"
        );
    }

    #[test]
    fn a_call_has_ended_once_it_has_an_end_time_or_an_error() {
        assert!(ended(&call("g", 1, false, None)));
        assert!(!ended(
            &json!({"grain": "g", "ended_ms": null, "error": null})
        ));
        assert!(ended(
            &json!({"grain": "g", "ended_ms": null, "error": {"message": "x"}})
        ));
    }
}
