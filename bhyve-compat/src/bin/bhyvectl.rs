//! `bhyvectl` for vmmfs; see bhyvectl(8).

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let prog = bhyve_compat::progname("bhyvectl");
    let code = bhyve_compat::ctl::bhyvectl_main(&prog, &bhyve_compat::args());
    std::process::exit(code);
}
