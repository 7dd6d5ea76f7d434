//! `bhyve` for vmmfs; see bhyve(8).

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let prog = bhyve_compat::progname("bhyve");
    let args = bhyve_compat::args();
    if bhyve_compat::print_version(&prog, &args) {
        return;
    }
    let code = bhyve_compat::run::bhyve_main(&prog, &args);
    std::process::exit(code);
}
