//! Links the agent as a position-dependent executable: with PIE the loader must apply ~39 000
//! relative relocations at every start, reading `.rela.dyn` and dirtying `.data.rel.ro`, which
//! costs every idle agent about 1.5 MiB of resident memory. The agent is started hundreds of
//! times per host and gains nothing from ASLR of its own image that its sandbox does not give.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
