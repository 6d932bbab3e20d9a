//! The `autohttps` binary: `serve` runs the sidecar; the other subcommands talk to its admin API.

fn main() {
    eprintln!("autohttps: the sidecar is not built yet");
    std::process::exit(2);
}
