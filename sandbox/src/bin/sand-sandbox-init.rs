//! The sandbox holder as a standalone binary, for this crate's tests. The `sand` binary runs
//! the same [`sand_sandbox::init_main`] behind a hidden subcommand.

fn main() {
    sand_sandbox::init_main()
}
