//! `tunmesh-router`: the node agent. Wiring only: the program is the
//! library's `app` (flags, startup, the main loop), with no fault to
//! inject.

fn main() -> std::process::ExitCode {
    tunmesh_router::app::main(&tunmesh_router::handover::NoFaults)
}
