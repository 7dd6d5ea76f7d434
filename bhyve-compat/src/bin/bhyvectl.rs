//! `bhyvectl` for vmmfs; see bhyvectl(8).

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let prog = bhyve_compat::progname("bhyvectl");
    let args = bhyve_compat::args();
    if bhyve_compat::print_version(&prog, &args) {
        return;
    }
    let code = bhyve_compat::ctl::bhyvectl_main(&prog, &args);
    std::process::exit(code);
}
