//! The gateway's UDP sockets: one per lane (see [`crate::lane`]), both bound
//! to the listen address, with the kernel choosing between them by the lane
//! byte of each datagram.
//!
//! The two sockets form an `SO_REUSEPORT` group, and a classic BPF program
//! attached to the group (`SO_ATTACH_REUSEPORT_CBPF`) returns the index of
//! the socket a datagram goes to: 1 (the interactive socket) for a WireGuard
//! data message whose lane byte says interactive, 0 (the bulk socket, bound
//! first) for anything else, including datagrams too short to say. The
//! kernel runs it per datagram, or per batch that GRO coalesced, by the
//! batch's first datagram; the sender puts every interactive datagram in a
//! run of its own for that reason.
//!
//! Before the group binds, a plain socket binds the address and lets it go:
//! a port already taken, by another gateway's group too, is an error as it
//! was with one socket. If the second socket or the program cannot be set
//! up (a kernel without reuseport BPF, a sandbox that refuses it), the
//! gateway runs with the bulk socket alone and says so: everything then
//! shares one queue, as before lanes.

// Unsafe code: `setsockopt(SO_ATTACH_REUSEPORT_CBPF)`, which neither the
// standard library, socket2 nor rustix wraps.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::net::UdpSocket;

use crate::lane::{LANE_INTERACTIVE, LANE_OFFSET, MESSAGE_DATA};

/// Receive and send buffer asked of each UDP socket, bytes: room for a burst
/// of about 2800 full datagrams while the loop is busy. The kernel caps it
/// at `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The sockets of a gateway.
pub(super) struct Sockets {
    /// Bulk datagrams, handshakes, everything unmarked; the gateway sends
    /// on it.
    pub bulk: UdpSocket,
    /// Interactive datagrams, when the kernel took the program.
    pub interactive: Option<UdpSocket>,
}

/// Binds the sockets of a gateway listening on `addr`.
pub(super) fn bind(addr: SocketAddr) -> io::Result<Sockets> {
    let probe = std::net::UdpSocket::bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    let bulk = new_socket(addr)?;
    let interactive = match attach_lane_program(&bulk).and_then(|()| new_socket(addr)) {
        Ok(socket) => Some(UdpSocket::from_std(socket.into())?),
        Err(e) => {
            tracing::warn!(error = %e, "no interactive lane: every datagram shares one socket");
            None
        }
    };
    Ok(Sockets {
        bulk: UdpSocket::from_std(bulk.into())?,
        interactive,
    })
}

/// A socket of the group, bound, with large buffers: a burst that finds the
/// loop busy waits in the kernel instead of being dropped there.
fn new_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs drops under load.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    tracing::debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "UDP socket buffers"
    );
    socket.set_nonblocking(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// The program that picks a datagram's socket. A load past the end of the
/// datagram ends it with 0.
fn lane_program() -> [libc::sock_filter; 6] {
    let code = |bits: u32| u16::try_from(bits).expect("BPF opcodes fit 16 bits");
    let ld_b_abs = code(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS);
    let jeq_k = code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K);
    let ret_k = code(libc::BPF_RET | libc::BPF_K);
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        // The UDP payload's first byte: the message type.
        op(ld_b_abs, 0, 0, 0),
        op(jeq_k, 0, 3, u32::from(MESSAGE_DATA)),
        op(
            ld_b_abs,
            0,
            0,
            u32::try_from(LANE_OFFSET).expect("a small offset"),
        ),
        op(jeq_k, 0, 1, u32::from(LANE_INTERACTIVE)),
        op(ret_k, 0, 0, 1),
        op(ret_k, 0, 0, 0),
    ]
}

/// Attaches [`lane_program`] to the reuseport group of `socket`.
fn attach_lane_program(socket: &socket2::Socket) -> io::Result<()> {
    let mut program = lane_program();
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len()).expect("six instructions"),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points to `program`, which lives until the call
    // returns; the kernel copies the program and keeps no pointer to it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::sock_fprog>())
                .expect("a small struct"),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
