//! The sandbox holder for the worker's tests: `AppHost`s made there start it as their
//! `Isolation::Sandbox` program (the `sand` binary, which plays this role in production, is
//! not built for them).

fn main() {
    sand_sandbox::init_main()
}
