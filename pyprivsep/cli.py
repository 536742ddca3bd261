"""pyprivsep [-dnvV] [-D macro=value] [-f file]"""
from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import socket
import sys

from pyprivsep import (__version__, control, ctl, environment, keyref, keys,
                       metrics, native, parent, privsep, relay, tables)
from pyprivsep.config import Config, ConfigError, parse_config, parse_macro_arg

DEFAULT_CONF = "/etc/pyprivsep.conf"
SYSLOG_SOCKET = "/dev/log"
log = logging.getLogger("pyprivsep")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="pyprivsep", usage="pyprivsep [-dnvV] [-D macro=value] [-f file]",
        description="TLS relay with privilege-separated private keys")
    ap.add_argument("-d", action="store_true", help="stay in the foreground, "
                    "log to stderr")
    ap.add_argument("-n", action="store_true", help="check the configuration "
                    "(certificates and keys included) and exit")
    ap.add_argument("-v", action="count", default=0, help="more logging")
    ap.add_argument("-V", action="store_true", help="print the version and "
                    "the TLS library, and exit")
    ap.add_argument("-D", action="append", default=[], metavar="macro=value",
                    help="define a macro")
    ap.add_argument("-f", default=DEFAULT_CONF, metavar="file",
                    help=f"configuration file (default {DEFAULT_CONF})")
    return ap.parse_args(argv)


def setup_logging(foreground: bool, verbose: int) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    if foreground:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
    else:
        h = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        h.setFormatter(logging.Formatter(f"pyprivsep[{os.getpid()}]: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def check_config(cfg: Config) -> None:
    """-n: every certificate and key read, each key matched to its
    certificate as a ca does, every OCSP response and client CA file
    checked as the parent does (warnings logged), and every relay block
    set up as a relay process would (keys in-process, no sockets).  This process exits right
    after; the daemon's parent never loads a key."""
    certs = [parent.relay_certs(r) for r in cfg.relays]
    client_cas = [None if r.client_ca is None else keys.load_client_ca(r.client_ca)
                  for r in cfg.relays]
    for cert in (c for block in certs for c in block):
        keys.load_key(cert, check=False)    # a token key: checked below
    # keys in a PKCS#11 token: in a child that loads the module, becomes
    # `ca user` and signs with each, as a ca will (parent.check_keys_error)
    if any(kp.p11 is not None for r in cfg.relays for kp in r.keypairs) or \
            any(kp.p11 is not None for ks in cfg.keyservices for kp in ks.keypairs):
        error = parent.check_keys_error(cfg, files=False)
        if error is not None:
            raise error
    parent.read_file_tickets(cfg)     # `tls ticket keys`: the file's rules
    for ks in cfg.keyservices:        # the same rules for a keyservice's keys
        for kp in ks.keypairs:
            keys.load_key(keys.load_cert(kp), check=False)
    # keys in a token stay there: such keypairs are set up in the check's
    # engine as a relay's are, with a ca channel (never used: no loop runs)
    ca_link = (socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
               if any(kp.p11 is not None for r in cfg.relays for kp in r.keypairs)
               else None)
    native.engine_init(id=0, ca_fd=-1 if ca_link is None else ca_link[0].fileno(),
                       ctl_fd=-1,
                       max_conns=cfg.max_connections,
                       handshake_timeout=cfg.handshake_timeout,
                       keyops_async=relay.keyops_async(cfg),
                       log_conn="connection" in cfg.log,
                       log_errors="errors" in cfg.log,
                       ticket_lifetime=cfg.ticket_lifetime,
                       use_syslog=False, verbose=False)
    relay.configure(cfg, certs, tables.hosts_of(cfg),
                    [[] for _ in cfg.relays], inprocess=True,
                    client_cas=client_cas)


def control_server(cfg: Config) -> control.Server | None:
    """The control socket, or None if it cannot be made (the daemon runs
    without); control.InUse if another daemon listens on it."""
    try:
        return control.Server(cfg.socket)
    except control.InUse:
        raise
    except OSError as e:
        log.warning("no control socket %s: %s", cfg.socket, e.strerror or e)
        return None


def daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(fd, std)
    if fd > 2:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        return ctl.main(argv[1:])
    if argv[:1] == ["keyref"]:
        return keyref.keyref_main(argv[1:])
    if argv[:1] == ["openssl-conf"]:
        return keyref.openssl_conf_main(argv[1:])
    args = parse_args(argv)
    if args.V:
        print(f"pyprivsep {__version__}, {native.library_version()}")
        return 0
    if not args.n:
        # the daemon: nothing of our caller's environment but what we need
        # may reach the children's memory (environment.py)
        environment.reexec_clean(argv)
    setup_logging(True, args.v)
    try:
        macros = dict(parse_macro_arg(d) for d in args.D)
    except ValueError as e:
        log.error("pyprivsep: -D %s", e)
        return 1
    ctl_server = None
    try:
        cfg = parse_config(args.f, macros)
        privsep.check_users(cfg)
        if args.n:
            check_config(cfg)
            print("configuration OK", file=sys.stderr)
            return 0
        # before binding a port or forking: a second daemon on the same
        # control socket would fight the first for its ports and clients
        ctl_server = control_server(cfg)
        if not args.d:
            if not os.path.exists(SYSLOG_SOCKET):
                log.error("pyprivsep: no syslog socket %s: run with -d",
                          SYSLOG_SOCKET)
                return 1
            daemonize()
            setup_logging(False, args.v)
        setup = parent.prepare(cfg, use_syslog=not args.d, verbose=bool(args.v))
        services = parent.prepare_services(cfg)
        keyops = "async" if relay.keyops_async(cfg) else "blocking"
    except ConfigError as e:
        log.error("%s", e)
        if ctl_server is not None:
            ctl_server.close()
        return 1
    except control.InUse as e:
        log.error("pyprivsep: %s; not starting", e)
        return 1
    environment.clear_in_children()
    privsep.set_title("parent")
    privsep.prepare_chroot(cfg)
    if not privsep.is_root():
        log.warning("not running as root: no chroot, no privilege drop")
    if cfg.keys_inprocess:
        log.warning("WARNING: keys inprocess: the private keys are loaded "
                    "into the relay processes; privilege separation is OFF. "
                    "For benchmarks only.")
    log.info("pyprivsep %s starting: %d relay processes, %d keyservices, "
             "%s, keyops %s", __version__, parent.relay_processes(cfg),
             len(cfg.keyservices), native.library_version(), keyops)
    daemon = parent.Parent(cfg, setup, macros, services)
    daemon.control = ctl_server
    if cfg.metrics is not None:
        try:
            daemon.metrics = metrics.Server(daemon, cfg.metrics.host,
                                            cfg.metrics.port)
        except OSError as e:
            log.error("%s: metrics: cannot listen on %s port %d: %s",
                      cfg.metrics.where, cfg.metrics.host, cfg.metrics.port,
                      e.strerror or e)
            if ctl_server is not None:
                ctl_server.close()
            for svc in services:
                svc.close(unlink=True)
            return 1
    return daemon.run()
