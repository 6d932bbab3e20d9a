//! `autohttps-render TEMPLATE [VARS.env …] [autohttps.toml] [NAME=VALUE …] > rendered.yaml`:
//! renders an `envoy/*.yaml` template with the kit's one `${NAME}` renderer (see
//! `autohttps_kit::render`), for `make` and for operators.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let override_list = std::env::var("AUTOHTTPS_EDGE_TRUSTED_PROXIES").ok();
    match autohttps_kit::render::render_command_line(&args, override_list.as_deref()) {
        Ok(text) => print!("{text}"),
        Err(error) => {
            eprintln!("autohttps-render: {error:#}");
            std::process::exit(2);
        }
    }
}
