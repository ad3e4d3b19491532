//! The only module with `unsafe` code: what must run between `fork` and
//! `exec` in a new worker, descriptors inherited by number, registration
//! with Tokio's reactor, the calling thread's scheduling policy, the
//! reuseport steering program, and read-only mappings of sealed memory
//! files.
//!
//! Everything else in the crate goes through the safe wrappers of `rustix`,
//! `socket2` and `tokio`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use rustix::io::FdFlags;
use rustix::process::Pid;

use crate::Signal;

/// Where each inherited descriptor must sit in the new process.
#[derive(Debug, Default)]
pub(crate) struct ChildFds {
    /// `(descriptor in the parent, fd number in the child)`.
    moves: Vec<(OwnedFd, RawFd)>,
}

impl ChildFds {
    /// Asks for `fd` to appear as `target` in the child, without close-on-exec.
    pub(crate) fn place(&mut self, fd: OwnedFd, target: RawFd) {
        self.moves.push((fd, target));
    }

    /// The highest fd number a descriptor is moved to in the child.
    pub(crate) fn highest_target(&self) -> RawFd {
        self.moves.iter().map(|(_, t)| *t).max().unwrap_or(2)
    }

    /// The highest target fd, to pick scratch numbers above it.
    fn scratch_base(&self) -> RawFd {
        let highest_source = self
            .moves
            .iter()
            .map(|(fd, _)| fd.as_raw_fd())
            .max()
            .unwrap_or(0);
        let highest_target = self.moves.iter().map(|(_, t)| *t).max().unwrap_or(0);
        highest_source.max(highest_target) + 1
    }
}

/// Arranges for the child started by `command` to
/// 1. get `SIGKILL` when the thread that spawns it dies (so a worker never
///    outlives its primary, even when the primary is `SIGKILL`ed), and exit at
///    once if the primary is already gone;
/// 2. find each descriptor of `fds` at its target number, inheritable, while
///    every other descriptor of the primary stays close-on-exec;
/// 3. run in a process group of its own when `own_group` is set, so a
///    terminal's Ctrl-C reaches the primary alone and the primary decides how
///    to stop.
///
/// The descriptors are moved into the closure and closed in the parent when
/// `command` is dropped.
/// 4. get back the open-file limit (`RLIMIT_NOFILE`) it would have had, when
///    the primary raised its own (`open_files`).
pub(crate) fn prepare_child(
    command: &mut tokio::process::Command,
    fds: ChildFds,
    own_group: bool,
    normal_scheduling: bool,
    open_files: Option<rustix::process::Rlimit>,
) {
    let parent = rustix::process::getpid();
    let base = fds.scratch_base();
    let moves = fds.moves;
    let hook = move || -> std::io::Result<()> {
        // Only async-signal-safe system calls from here on: no allocation, no
        // locks, no logging.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
        if rustix::process::getppid() != Some(parent) {
            // The primary died between fork and prctl: nobody would reap us.
            std::process::abort();
        }
        if own_group {
            rustix::process::setpgid(None, None)?;
        }
        if normal_scheduling {
            set_normal_scheduling();
        }
        move_fds(&moves, base)?;
        if let Some(limit) = open_files {
            rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)?;
        }
        Ok(())
    };
    // SAFETY: `pre_exec` asks that the hook, which runs in the forked child
    // before `exec`, do only what is safe in a child of a multi-threaded
    // process: no allocation, no lock, async-signal-safe calls only. It makes
    // system calls through rustix (prctl, getppid, setpgid, fcntl, prlimit64)
    // and libc (dup2, fcntl), all async-signal-safe, plus
    // `sched_setscheduler`, which POSIX does not list as such but glibc and
    // musl implement as a bare system call stub; `abort` is async-signal-safe
    // too. Its errors are `io::Error`s made from an errno, which allocate
    // nothing. The captured vector was allocated before the fork and is only
    // read.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Two phases, so that a source sitting on another entry's target number is
/// never overwritten before it has been copied: first copy every source above
/// all numbers involved, then `dup2` each copy down onto its target. `dup2`
/// clears close-on-exec on the target; the scratch copies are close-on-exec
/// and vanish at `exec`.
fn move_fds(moves: &[(OwnedFd, RawFd)], base: RawFd) -> std::io::Result<()> {
    const MAX_MOVES: usize = 64;
    if moves.len() > MAX_MOVES {
        return Err(std::io::Error::from_raw_os_error(
            rustix::io::Errno::MFILE.raw_os_error(),
        ));
    }
    let mut scratch: [RawFd; MAX_MOVES] = [-1; MAX_MOVES];
    for (i, (fd, _)) in moves.iter().enumerate() {
        let copy = rustix::io::fcntl_dupfd_cloexec(fd, base)?;
        scratch[i] = copy.as_raw_fd();
        // The child is about to exec: leave the copy open until then.
        std::mem::forget(copy);
    }
    for (i, (_, target)) in moves.iter().enumerate() {
        // SAFETY: `dup2` and `fcntl(F_SETFD)` take descriptor numbers and no
        // pointer. `scratch[i]` is a copy this child made above and keeps
        // open until exec; `target` is a number the child wants filled,
        // open or not: dup2 closes whatever is there, atomically, and that
        // belongs to the parent's image, which nothing in this child uses
        // again before exec replaces it. dup2 leaves the new descriptor
        // without close-on-exec, except when source and target are the same
        // number, which cannot happen here (scratch numbers are above every
        // target); the flag is cleared explicitly all the same.
        let placed = unsafe {
            libc::dup2(scratch[i], *target) == *target
                && libc::fcntl(*target, libc::F_SETFD, 0) == 0
        };
        if !placed {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether descriptor number `fd` is open in this process, asked without
/// borrowing it (a borrow must only ever name an open descriptor).
fn is_open(fd: RawFd) -> bool {
    // SAFETY: `fcntl(F_GETFD)` takes a bare number and no pointer: it reads
    // the descriptor's flags, or fails with EBADF when nothing is open at
    // that number. Nothing is borrowed, owned or closed.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0
}

/// Takes a descriptor number handed down by the parent, such as the worker's
/// channel at fd 3, and marks it close-on-exec so the worker's own children do
/// not inherit it.
///
/// Returns `None` if `fd` is not open.
pub(crate) fn adopt_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if !is_open(fd) {
        return None;
    }
    // SAFETY: `from_raw_fd` needs an open descriptor that nothing else in
    // the process owns. It is open (checked just above, on the bare number).
    // The only caller, the worker handshake, adopts it once it has checked
    // that it is the socket the primary placed for this process (its peer is
    // the primary), and at most once per process (under `role()`'s lock; a
    // failure after adoption is latched, so there is no second attempt).
    // Nothing else owns it as long as the application leaves a worker's
    // fd 3 ([`crate::CHANNEL_FD`]) to the library, as documented.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC).ok()?;
    Some(owned)
}

/// Runs `f` with a borrow of descriptor number `fd`, if it is open, without
/// taking ownership of it: for looking at a descriptor this process
/// inherited before deciding whether to adopt it.
pub(crate) fn with_inherited_fd<R>(
    fd: RawFd,
    f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> R,
) -> Option<R> {
    if !is_open(fd) {
        return None;
    }
    // SAFETY: `borrow_raw` needs a number that stays open while borrowed.
    // It is open (checked just above) and nothing here closes it: the
    // borrow lives for this call only, ownership is never taken. The number
    // is inherited and owned by no handle of the library; should code
    // elsewhere in the process close it meanwhile, `f`'s queries fail with
    // EBADF, or ask about whatever took the number, and touch no memory.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    Some(f(borrowed))
}

/// Takes a usable copy of a descriptor this process inherited by number (a
/// socket passed by systemd through `LISTEN_FDS`): returns a close-on-exec
/// duplicate and marks the original close-on-exec too, so it does not leak
/// into children. The original number is not claimed (nothing here closes
/// it), so calling this twice, or on a number other code owns, is harmless.
/// `None` if `fd` is not open.
pub(crate) fn duplicate_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if !is_open(fd) {
        return None;
    }
    // SAFETY: `borrow_raw` needs a number that stays open while borrowed.
    // It is open (checked just above) and nothing here closes it: the
    // borrow lasts for this function only and is used for two `fcntl` calls.
    // The number is inherited and owned by no handle of the library; should
    // code elsewhere in the process close it meanwhile, those calls fail
    // with EBADF, or act on whatever took the number, and touch no memory.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let copy = rustix::io::fcntl_dupfd_cloexec(borrowed, 0).ok()?;
    let _ = rustix::io::fcntl_setfd(borrowed, FdFlags::CLOEXEC);
    Some(copy)
}

fn to_pid(pid: u32) -> std::io::Result<Pid> {
    let invalid = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    Pid::from_raw(i32::try_from(pid).map_err(|_| invalid())?).ok_or_else(invalid)
}

/// Sends `signal` to process `pid` (`kill(2)`).
pub(crate) fn kill(pid: u32, signal: Signal) -> std::io::Result<()> {
    rustix::process::kill_process(to_pid(pid)?, signal.to_os()).map_err(Into::into)
}

/// Sends `signal` to every process of the group `pgid` (`killpg(3)`).
pub(crate) fn kill_group(pgid: u32, signal: Signal) -> std::io::Result<()> {
    rustix::process::kill_process_group(to_pid(pgid)?, signal.to_os()).map_err(Into::into)
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`):
/// unlike a pid, a pidfd never names a recycled process.
#[cfg(target_os = "linux")]
pub(crate) fn pidfd_signal(pidfd: &OwnedFd, signal: Signal) -> std::io::Result<()> {
    rustix::process::pidfd_send_signal(pidfd, signal.to_os()).map_err(Into::into)
}

/// Elsewhere there are no pidfds; none is ever opened.
#[cfg(not(target_os = "linux"))]
pub(crate) fn pidfd_signal(_pidfd: &OwnedFd, _signal: Signal) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Registers a descriptor this process owns with the Tokio reactor, for
/// readiness-driven IO that Tokio's own socket types do not offer (accepting
/// a connection without registering it).
///
/// # Errors
/// When the reactor refuses the registration.
pub(crate) fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the descriptor must stay open, name the same description and
    // be what `as_raw_fd` returns for the `AsyncFd`'s whole life. `fd` is an
    // `OwnedFd` moved into the `AsyncFd`, which owns it until dropped, and
    // `OwnedFd::as_raw_fd` always returns the same number; no caller swaps
    // it out through `AsyncFd::get_mut` (the crate only uses `get_ref`).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, interest).map_err(|e| e.into_parts().1)
    }
}

/// Puts the calling thread under Linux's `SCHED_BATCH` policy: it keeps its
/// share of the CPU but no longer preempts a running thread when it wakes
/// up. Threads it creates afterwards inherit the policy; workers are put
/// back under the normal one between fork and exec.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn set_batch_scheduling() -> std::io::Result<()> {
    set_scheduling_policy(libc::SCHED_BATCH)
}

/// Puts the calling thread back under the normal policy (`SCHED_OTHER`), as
/// a worker forked by a batch-scheduled primary must be. Best effort: a
/// worker that cannot leave the primary's policy still runs. Safe between
/// fork and exec.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_normal_scheduling() {
    let _ = set_scheduling_policy(libc::SCHED_OTHER);
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_scheduling_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised `sched_param` that outlives the
    // call, which only reads it; pid 0 means the calling thread, whose
    // policy is all that changes. The libc function is a bare system call
    // stub (glibc, musl): no allocation, no lock, so it may also run between
    // fork and exec.
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere there is no such policy.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn set_batch_scheduling() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SCHED_BATCH exists on Linux only",
    ))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_normal_scheduling() {}

/// `SO_ATTACH_REUSEPORT_CBPF` where Linux gives it the generic number.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(any(target_arch = "sparc", target_arch = "sparc64"))
))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches a classic BPF program, as `(code, jt, jf, k)` instructions, to
/// the reuseport group of `socket` (`setsockopt(SO_ATTACH_REUSEPORT_CBPF)`,
/// socket(7)).
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(any(target_arch = "sparc", target_arch = "sparc64"))
))]
pub(crate) fn attach_reuseport_program(
    socket: std::os::fd::BorrowedFd<'_>,
    program: &[(u16, u8, u8, u32)],
) -> std::io::Result<()> {
    let mut filters: Vec<libc::sock_filter> = program
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect();
    let len = u16::try_from(filters.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: filters.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `len` initialised `sock_filter`s in
    // `filters`, which outlives the call; the kernel copies the program and
    // keeps no pointer to it. The option's length is the size of the
    // `sock_fprog` passed, and `socket` is a descriptor borrowed for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the kernel has no such program: the group keeps the kernel's
/// own choice.
#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    not(any(target_arch = "sparc", target_arch = "sparc64"))
)))]
pub(crate) fn attach_reuseport_program(
    _socket: std::os::fd::BorrowedFd<'_>,
    _program: &[(u16, u8, u8, u32)],
) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// A read-only view of the whole content of a sealed memory file (Linux
/// `memfd`), mapped shared: the bytes are the file's pages, not a copy.
/// Unmapped when dropped.
pub(crate) struct SealedMapping {
    ptr: *mut std::ffi::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and its file can no longer be written,
// grown or shrunk by anyone (`map_sealed` checks the seals), so the bytes
// never change and every page stays backed: sharing the pointer between
// threads is as safe as sharing a `&'static [u8]`.
unsafe impl Send for SealedMapping {}
// SAFETY: as for `Send`: nothing can change what the pointer shows.
unsafe impl Sync for SealedMapping {}

impl AsRef<[u8]> for SealedMapping {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the start of a live mapping of `len` readable
        // bytes (made by `map_sealed`, unmapped only on drop), whose content
        // cannot change (the file's write, grow and shrink seals are set) and
        // whose pages cannot vanish (no SIGBUS: the file cannot shrink). The
        // slice borrows `self`, so it cannot outlive the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for SealedMapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` describe a mapping made by `map_sealed` and
            // never unmapped before; no slice of it outlives `self`.
            let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
        }
    }
}

/// Maps a memory file that is sealed against writing, growing and shrinking
/// (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK`), so that another process
/// that sent it can change neither its bytes nor its size while they are
/// read here.
///
/// # Errors
/// `InvalidData` when the file lacks those seals (or is no memory file at
/// all), and the OS's errors.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn map_sealed(fd: &OwnedFd) -> std::io::Result<SealedMapping> {
    use rustix::fs::SealFlags;
    let needed = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK;
    let seals = rustix::fs::fcntl_get_seals(fd)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if !seals.contains(needed) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the memory file is not sealed against writes and resizing",
        ));
    }
    let len = usize::try_from(rustix::fs::fstat(fd)?.st_size)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    if len == 0 {
        return Ok(SealedMapping {
            ptr: std::ptr::null_mut(),
            len: 0,
        });
    }
    // SAFETY: a new read-only shared mapping at an address the kernel picks,
    // so no existing memory is touched; the file is sealed (checked above)
    // so its size stays `len` and its content stays as it is for as long as
    // the mapping lives. The mapping is owned by the returned value.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )?
    };
    Ok(SealedMapping { ptr, len })
}

/// Elsewhere there are no sealed memory files.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn map_sealed(_fd: &OwnedFd) -> std::io::Result<SealedMapping> {
    Err(std::io::ErrorKind::Unsupported.into())
}
