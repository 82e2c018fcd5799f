//! Which threads the kernel favours when the cores are contended (Linux; elsewhere nothing).
//!
//! While a model decodes on the CPU, llama.cpp keeps every core it was given busy: its threads
//! spin between operations instead of sleeping. Each token a stream produces wakes an HTTP
//! task, and a woken thread of the normal class may preempt whatever runs on the core it lands
//! on, which is often the engine thread in the middle of sampling the next step. On the
//! project's 2-core machine (SmolLM2, 2 threads) handing one token to its stream took the
//! engine thread 140–220 µs with one stream and 570–770 µs a step with four, almost all of it
//! spent preempted. The HTTP runtime's threads therefore run in `SCHED_BATCH`, whose wakeups
//! never preempt a running thread (its work waits for a free core or the next tick instead),
//! and the engine threads, which inherit the class of the thread that spawns them, are put
//! back in the normal class. That brought the hand-over down to 25–50 µs a step. Both changes
//! are allowed to an unprivileged process and touch no nice value.

/// Puts the calling thread in the batch class: it no longer preempts on wakeup.
pub fn background() {
    set(Class::Batch);
}

/// Puts the calling thread (and the threads it spawns from now on) in the normal class.
pub fn foreground() {
    set(Class::Normal);
}

#[derive(Debug, Clone, Copy)]
enum Class {
    Batch,
    Normal,
}

#[cfg(target_os = "linux")]
fn set(class: Class) {
    let policy = match class {
        Class::Batch => libc::SCHED_BATCH,
        Class::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialized sched_param that outlives the call; pid 0 names
    // the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc != 0 {
        // A seccomp profile or an unusual kernel may refuse; scheduling then stays as it was.
        tracing::debug!(
            ?class,
            error = %std::io::Error::last_os_error(),
            "could not change the thread's scheduling class"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn set(_class: Class) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn class() -> i32 {
        // SAFETY: no arguments beyond the calling thread's id.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_thread_goes_to_the_batch_class_and_back_and_its_children_inherit_it() {
        std::thread::spawn(|| {
            background();
            assert_eq!(class(), libc::SCHED_BATCH);
            let child = std::thread::spawn(class).join().expect("child thread");
            assert_eq!(child, libc::SCHED_BATCH);
            foreground();
            assert_eq!(class(), libc::SCHED_OTHER);
        })
        .join()
        .expect("test thread");
    }
}
