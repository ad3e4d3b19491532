//! Kernel steering of a reuseport group: a classic BPF program attached to
//! the group (`SO_ATTACH_REUSEPORT_CBPF`, Linux 4.6 and later, no privilege
//! needed) picks the socket for each new connection, so that connections
//! go only to sockets whose slot has a worker accepting, never into the
//! queue of a slot whose worker is restarting or has been retired.
//!
//! The program returns an index into the kernel's array of the group's
//! sockets. The kernel appends a socket to that array when it starts
//! listening and, when one closes, moves the last socket into its place;
//! [`SocketOrder`] mirrors that. An index out of range (no socket eligible,
//! or every socket eligible) lets the kernel pick by its own hash, as
//! without a program.
//!
//! Everything here but [`attach`] is plain data, tested alone; the tests
//! also check the kernel's behaviour on real sockets.

use std::io;
use std::os::fd::AsFd;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Instruction {
    pub(crate) code: u16,
    pub(crate) jt: u8,
    pub(crate) jf: u8,
    pub(crate) k: u32,
}

// Opcodes (linux/filter.h, linux/bpf_common.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const TAX: u16 = 0x00;
const IMM: u16 = 0x00;
const AND: u16 = 0x50;
const JGT: u16 = 0x20;
const A: u16 = 0x10;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MSH: u16 = 0xa0;
const K: u16 = 0x00;
const X: u16 = 0x08;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const MOD: u16 = 0x90;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;

/// Offsets into the network header (`SKF_NET_OFF`): the program sees the
/// packet from after the TCP header.
const NET: u32 = (-0x100000i32) as u32;

/// An index the kernel's array never has: it then picks by its own hash.
const KERNEL_CHOOSES: u32 = u32::MAX;

/// Most instructions a classic BPF program may have (`BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

fn op(code: u16, k: u32) -> Instruction {
    Instruction {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Instruction {
    Instruction { code, jt, jf, k }
}

/// The kernel's array of a reuseport group's sockets, mirrored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketOrder<T> {
    sockets: Vec<T>,
}

impl<T> Default for SocketOrder<T> {
    fn default() -> Self {
        Self {
            sockets: Vec::new(),
        }
    }
}

impl<T: PartialEq + Copy> SocketOrder<T> {
    /// `socket` started listening: the kernel appends it.
    pub(crate) fn listening(&mut self, socket: T) {
        if !self.sockets.contains(&socket) {
            self.sockets.push(socket);
        }
    }

    /// `socket` closed (its last descriptor): the last socket takes its
    /// place.
    pub(crate) fn closed(&mut self, socket: T) {
        if let Some(at) = self.sockets.iter().position(|s| *s == socket) {
            self.sockets.swap_remove(at);
        }
    }

    /// The kernel's indexes of the sockets `eligible` accepts.
    pub(crate) fn indexes(&self, eligible: impl Fn(&T) -> bool) -> Vec<u32> {
        self.sockets
            .iter()
            .enumerate()
            .filter(|(_, s)| eligible(s))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The kernel's index of `socket`.
    pub(crate) fn position(&self, socket: &T) -> Option<u32> {
        self.sockets
            .iter()
            .position(|s| s == socket)
            .map(|i| i as u32)
    }

    /// How many sockets the group has.
    pub(crate) fn len(&self) -> usize {
        self.sockets.len()
    }
}

/// A program that spreads new TCP connections over the sockets at
/// `eligible` (indexes into the kernel's array of `total` sockets) by a hash
/// of the client's address and port. With none eligible, or all, the
/// kernel chooses, as without a program.
pub(crate) fn spread(eligible: &[u32], total: usize) -> Vec<Instruction> {
    if eligible.is_empty() || eligible.len() >= total || 16 + 2 * eligible.len() > MAX_INSTRUCTIONS
    {
        return vec![op(RET | K, KERNEL_CHOOSES)];
    }
    let mut program = vec![
        // The IP version, from the first byte of the network header.
        op(LD | B | ABS, NET),
        op(ALU | RSH | K, 4),
        jump(JMP | JEQ | K, 6, 7, 0),
        // IPv4: the source address, then the source port, whose place
        // depends on the header's length.
        op(LD | W | ABS, NET.wrapping_add(12)),
        op(ST, 0),
        op(LDX | B | MSH, NET),
        op(LD | H | IND, NET),
        op(LDX | MEM, 0),
        op(ALU | XOR | X, 0),
        jump(JMP | JA, 5, 0, 0),
        // IPv6: the source address's last word, then the source port.
        op(LD | W | ABS, NET.wrapping_add(20)),
        op(ST, 0),
        op(LD | H | ABS, NET.wrapping_add(40)),
        op(LDX | MEM, 0),
        op(ALU | XOR | X, 0),
        // Mix, then pick one of the eligible sockets.
        op(ALU | MUL | K, 0x9E37_79B1),
        op(ALU | RSH | K, 16),
        op(ALU | MOD | K, eligible.len() as u32),
    ];
    for (i, index) in eligible.iter().enumerate() {
        program.push(jump(JMP | JEQ | K, i as u32, 0, 1));
        program.push(op(RET | K, *index));
    }
    program.push(op(RET | K, eligible[0]));
    program
}

/// Most slots a sticky program can weigh within the kernel's limit on a
/// program's length.
pub(crate) const MAX_STICKY_SLOTS: usize = 200;

/// MurmurHash3's finaliser on the accumulator (see
/// [`rendezvous::fmix`](crate::sticky::rendezvous::fmix)).
fn push_fmix(program: &mut Vec<Instruction>) {
    use crate::sticky::rendezvous::{FMIX1, FMIX2};
    for (shift, multiply) in [(16, Some(FMIX1)), (13, Some(FMIX2)), (16, None)] {
        program.push(op(MISC | TAX, 0));
        program.push(op(ALU | RSH | K, shift));
        program.push(op(ALU | XOR | X, 0));
        if let Some(multiply) = multiply {
            program.push(op(ALU | MUL | K, multiply));
        }
    }
}

/// A program that sends each new connection to the socket of the slot its
/// client's address weighs most for, by the rendezvous hashing of
/// [`crate::sticky`] (the primary computes the same): `slots` are the slots
/// the keys are hashed over, in ascending order, each with its index in the
/// kernel's array of sockets. The address counts by its first `v4_prefix`
/// or `v6_prefix` bits. With no slot, or more than [`MAX_STICKY_SLOTS`],
/// the kernel chooses.
pub(crate) fn by_address(
    slots: &[(crate::sticky::SlotId, u32)],
    v4_prefix: u8,
    v6_prefix: u8,
) -> Vec<Instruction> {
    use crate::sticky::rendezvous::{FOLD, mask, seed};
    if slots.is_empty() || slots.len() > MAX_STICKY_SLOTS {
        return vec![op(RET | K, KERNEL_CHOOSES)];
    }
    let mut program = vec![
        // The IP version, from the first byte of the network header.
        op(LD | B | ABS, NET),
        op(ALU | RSH | K, 4),
        jump(JMP | JEQ | K, 6, 3, 0),
        // IPv4: the source address's prefix.
        op(LD | W | ABS, NET.wrapping_add(12)),
        op(ALU | AND | K, mask(v4_prefix)),
    ];
    // IPv6: the source address's four words, masked, folded.
    let mut v6 = Vec::new();
    for word in 0..4u8 {
        let bits = v6_prefix.saturating_sub(32 * word).min(32);
        v6.push(op(LD | W | ABS, NET.wrapping_add(8 + 4 * u32::from(word))));
        v6.push(op(ALU | AND | K, mask(bits)));
        if word > 0 {
            v6.push(op(LDX | MEM, 0));
            v6.push(op(ALU | XOR | X, 0));
        }
        v6.push(op(ALU | MUL | K, FOLD));
        if word < 3 {
            v6.push(op(ST, 0));
        }
    }
    program.push(jump(JMP | JA, v6.len() as u32, 0, 0));
    program.extend(v6);
    // The key, in M[0].
    push_fmix(&mut program);
    program.push(op(ST, 0));
    // Each slot's weight; the heaviest so far in M[1], its socket in M[2].
    for (i, (slot, index)) in slots.iter().enumerate() {
        program.push(op(LD | MEM, 0));
        program.push(op(ALU | XOR | K, seed(*slot)));
        push_fmix(&mut program);
        if i > 0 {
            program.push(op(LDX | MEM, 1));
            program.push(jump(JMP | JGT | X, 0, 0, 3));
        }
        program.push(op(ST, 1));
        program.push(op(LD | W | IMM, *index));
        program.push(op(ST, 2));
    }
    program.push(op(LD | MEM, 2));
    program.push(op(RET | A, 0));
    program
}

/// Whether this kernel lets an unprivileged process attach a program to a
/// reuseport group (tried once, on a socket of its own).
pub(crate) fn kernel_takes_programs() -> bool {
    static TAKES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAKES.get_or_init(|| {
        let probe = || -> io::Result<()> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_port(true)?;
            socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
            socket.listen(1)?;
            attach(&socket, &by_address(&[(0, 0)], 32, 128))
        };
        match probe() {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "the kernel refuses reuseport programs: sticky sessions by address are routed by the primary");
                false
            }
        }
    })
}

/// Attaches `program` to the reuseport group of `socket` (a listening
/// socket of the group), replacing the group's previous program.
///
/// # Errors
/// When the kernel refuses the program (a kernel before 4.6, a sandbox that
/// forbids it): the group then keeps the kernel's own choice.
pub(crate) fn attach(socket: &impl AsFd, program: &[Instruction]) -> io::Result<()> {
    let raw: Vec<(u16, u8, u8, u32)> = program.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
    crate::sys::attach_reuseport_program(socket.as_fd(), &raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    #[test]
    fn the_order_mirrors_the_kernels_swap_on_close() {
        let mut order = SocketOrder::default();
        for s in ["a", "b", "c", "d"] {
            order.listening(s);
        }
        order.closed("b");
        assert_eq!(order.sockets, ["a", "d", "c"]);
        order.listening("e");
        order.closed("e");
        order.closed("a");
        assert_eq!(order.sockets, ["c", "d"]);
        assert_eq!(order.indexes(|s| *s == "d"), [1]);
    }

    #[test]
    fn with_none_or_all_eligible_the_kernel_chooses() {
        assert_eq!(spread(&[], 3), [op(RET | K, KERNEL_CHOOSES)]);
        assert_eq!(spread(&[0, 1, 2], 3), [op(RET | K, KERNEL_CHOOSES)]);
        assert_eq!(spread(&[1], 3).last(), Some(&op(RET | K, 1)));
    }

    fn reuseport_socket(addr: SocketAddr) -> Socket {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(128).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    /// Connects `n` clients and counts, per socket, the connections each
    /// socket's queue got.
    fn connections_per_socket(addr: SocketAddr, sockets: &[&Socket], n: usize) -> Vec<usize> {
        let mut clients = Vec::new();
        for _ in 0..n {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
        }
        let mut counts = vec![0; sockets.len()];
        let mut total = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while total < n {
            assert!(std::time::Instant::now() < deadline, "{counts:?}");
            for (i, socket) in sockets.iter().enumerate() {
                while socket.accept().is_ok() {
                    counts[i] += 1;
                    total += 1;
                }
            }
        }
        counts
    }

    fn steered(loopback: &str) {
        let first = reuseport_socket(format!("{loopback}:0").parse().unwrap());
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let sockets = [first, reuseport_socket(addr), reuseport_socket(addr)];
        let mut order = SocketOrder::default();
        for i in 0..3 {
            order.listening(i);
        }
        // Socket 1 (a vacant slot) gets nothing.
        let program = spread(&order.indexes(|i| *i != 1), order.len());
        attach(&sockets[0], &program).unwrap();
        let all: Vec<&Socket> = sockets.iter().collect();
        let counts = connections_per_socket(addr, &all, 200);
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(counts[0] > 40 && counts[2] > 40, "spread: {counts:?}");

        // Socket 0 closes: the kernel moves socket 2 into its place, as
        // the mirror does; steering follows.
        let [first, second, third] = sockets;
        drop(first);
        order.closed(0);
        let program = spread(&order.indexes(|i| *i == 2), order.len());
        attach(&second, &program).unwrap();
        let counts = connections_per_socket(addr, &[&second, &third], 50);
        assert_eq!(counts, [0, 50]);
        let by_index: BTreeMap<usize, u32> = [(2, 0), (1, 1)].into();
        assert_eq!(order.indexes(|i| *i == 2), [by_index[&2]]);
    }

    /// Connects from each of `sources` and says which socket's queue got
    /// each connection.
    fn landing(addr: SocketAddr, sockets: &[Socket], sources: &[std::net::IpAddr]) -> Vec<usize> {
        let mut landed = Vec::new();
        for source in sources {
            let client = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
            client.bind(&SocketAddr::new(*source, 0).into()).unwrap();
            client.connect(&addr.into()).unwrap();
            let local = client.local_addr().unwrap().as_socket().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            'found: loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "connection from {local} not seen"
                );
                for (i, socket) in sockets.iter().enumerate() {
                    if let Ok((_, peer)) = socket.accept() {
                        assert_eq!(peer.as_socket(), Some(local));
                        landed.push(i);
                        break 'found;
                    }
                }
                std::thread::yield_now();
            }
        }
        landed
    }

    #[test]
    fn the_kernel_hashes_addresses_as_the_primary_does() {
        use crate::sticky::rendezvous;
        let first = reuseport_socket("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let sockets = [first, reuseport_socket(addr), reuseport_socket(addr)];
        // Slots 4, 7 and 9 hold the kernel's sockets 2, 0 and 1.
        let slots = [(4, 2), (7, 0), (9, 1)];
        for (v4_prefix, count) in [(32, 60), (24, 30)] {
            attach(&sockets[0], &by_address(&slots, v4_prefix, 128)).unwrap();
            let sources: Vec<std::net::IpAddr> = (0..count)
                .map(|i| std::net::IpAddr::from([127, 3, i as u8, 1 + (i * 7 % 200) as u8]))
                .collect();
            let landed = landing(addr, &sockets, &sources);
            for (source, socket) in sources.iter().zip(&landed) {
                let key = rendezvous::address_key(*source, v4_prefix, 128);
                let slot = rendezvous::choose(key, slots.iter().map(|(s, _)| *s)).unwrap();
                let expected = slots.iter().find(|(s, _)| *s == slot).unwrap().1;
                assert_eq!(*socket as u32, expected, "{source} /{v4_prefix}");
            }
            let used: std::collections::BTreeSet<usize> = landed.iter().copied().collect();
            assert_eq!(used.len(), 3, "every slot gets keys: {landed:?}");
        }
    }

    #[test]
    fn the_kernel_hashes_ipv6_addresses_as_the_primary_does() {
        use crate::sticky::rendezvous;
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            assert!(std::env::var_os("CI").is_none(), "IPv6 loopback is missing");
            return;
        }
        let first = reuseport_socket("[::1]:0".parse().unwrap());
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let sockets = [first, reuseport_socket(addr)];
        let slots = [(0, 0), (1, 1)];
        for v6_prefix in [128, 64] {
            attach(&sockets[0], &by_address(&slots, 32, v6_prefix)).unwrap();
            let source: std::net::IpAddr = "::1".parse().unwrap();
            let landed = landing(addr, &sockets, &[source, source]);
            let key = rendezvous::address_key(source, 32, v6_prefix);
            let slot = rendezvous::choose(key, [0, 1]).unwrap();
            assert_eq!(landed, [slot as usize, slot as usize], "/{v6_prefix}");
        }
    }

    #[test]
    fn the_kernel_runs_the_program_on_ipv4() {
        steered("127.0.0.1");
    }

    #[test]
    fn the_kernel_runs_the_program_on_ipv6() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            assert!(std::env::var_os("CI").is_none(), "IPv6 loopback is missing");
            return;
        }
        steered("[::1]");
    }
}
