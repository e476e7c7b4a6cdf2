//! `tunmesh-router-faults`: the router, built for tests, that fails a
//! handover where `TUNMESH_TEST_FAULT` says (`stop:STEP` stops the process
//! with SIGSTOP at that step so that a test can kill it there, `panic:STEP`
//! panics there; STEP is one of `handover::Step`'s names, e.g.
//! `after-ack`). Without the variable it is the router. The router binary
//! itself cannot inject a fault: this is the only build that can.

use tunmesh_router::handover::{Faults, Step};

struct EnvFault {
    at: Option<(Step, bool)>,
}

impl EnvFault {
    fn from_env() -> EnvFault {
        let at = std::env::var("TUNMESH_TEST_FAULT").ok().and_then(|v| {
            let (action, step) = v.split_once(':')?;
            let step = Step::parse(step)?;
            match action {
                "stop" => Some((step, false)),
                "panic" => Some((step, true)),
                _ => None,
            }
        });
        EnvFault { at }
    }
}

impl Faults for EnvFault {
    fn at(&self, step: Step) {
        let Some((at, panic)) = self.at else {
            return;
        };
        if at != step {
            return;
        }
        if panic {
            panic!("test fault: panicking at handover step {step}");
        }
        if step == Step::AfterWorkers {
            // Let the workers carry traffic first, so that they have sealed.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("test fault: stopping at handover step {step}");
        // SAFETY: raising a signal in this process.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}

fn main() -> std::process::ExitCode {
    let faults = EnvFault::from_env();
    if std::env::var_os("TUNMESH_TEST_FAULT").is_some() && faults.at.is_none() {
        eprintln!("tunmesh-router-faults: TUNMESH_TEST_FAULT must be stop:STEP or panic:STEP");
        return std::process::ExitCode::from(2);
    }
    tunmesh_router::app::main(&faults)
}
