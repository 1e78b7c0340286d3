//! A grain written with the Rust SDK, for the worker's tests and benchmark. Its input picks a
//! behaviour: a number is doubled; `"next"`, `"fan_out"`, `"fail"`, `"panic"`, `"crash"`,
//! `"pid"`, `"ctx"`, `"print"` and `"sleep"` do what they say; `"reach"` says whether the
//! instance still has a socket on fd 3 (the zygote's channel) and whether it is dumpable.

use sand_grain::{serve, Ctx, Output, Value};

fn handle(event: Value, ctx: &Ctx) -> Result<Output, String> {
    if let Some(n) = event.as_i64() {
        return Ok(Output::Return(Value::from(n * 2)));
    }
    match event.as_str() {
        Some("next") => Ok(ctx.next("second", Value::from(5))),
        Some("fan_out") => Ok(ctx.fan_out(
            [("left", Value::from(1)), ("right", Value::from(2))],
            "join",
        )),
        Some("fail") => Err("no luck".into()),
        Some("panic") => panic!("on purpose"),
        Some("crash") => std::process::abort(),
        Some("pid") => Ok(Value::from(std::process::id()).into()),
        Some("ctx") => Ok(serde_json::json!([ctx.exec, ctx.call, ctx.attempt, ctx.trace]).into()),
        Some("print") => {
            println!("to stdout");
            eprintln!("to stderr");
            Ok(Value::Null.into())
        }
        Some("reach") => {
            use std::os::unix::fs::FileTypeExt;
            let fd3_is_a_socket =
                std::fs::metadata("/proc/self/fd/3").is_ok_and(|meta| meta.file_type().is_socket());
            let dumpable = nix::sys::prctl::get_dumpable().map_err(|e| e.to_string())?;
            Ok(
                serde_json::json!({"fd3_is_a_socket": fd3_is_a_socket, "dumpable": dumpable})
                    .into(),
            )
        }
        Some("sleep") => {
            std::thread::sleep(std::time::Duration::from_secs(60));
            Ok(Value::Null.into())
        }
        _ => Err(format!("unknown event {event}")),
    }
}

fn main() {
    serve(handle)
}
