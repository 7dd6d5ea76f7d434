//! `bhyve` for vmmfs; see bhyve(8).

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let prog = bhyve_compat::progname("bhyve");
    let code = bhyve_compat::run::bhyve_main(&prog, &bhyve_compat::args());
    std::process::exit(code);
}
