"""`softprompt serve` (the OpenAI-compatible server) and `softprompt keys add|revoke|list` (its
tenants' keys file)."""

from __future__ import annotations

import sys

from softprompt.cli.common import print_json
from softprompt.options import from_args


def cmd_serve(args) -> int:
    from softprompt.api.app import ProxyConfig, RequestLimits, serve
    from softprompt.api.tenants import read_keys
    from softprompt.serving.registry import TierConfig
    from softprompt.serving.scheduler import SchedulerConfig
    from softprompt.serving.vllm.backend import VLLMConfig

    proxies = from_args(ProxyConfig, args)  # bad flags and keys fail now, not after the model loads
    tiers = from_args(TierConfig, args)
    if args.keys:
        read_keys(args.keys)
    serve(
        args.model,
        args.bank,
        host=args.host,
        port=args.port,
        backend=args.backend,
        vllm=from_args(VLLMConfig, args),
        scheduling=from_args(SchedulerConfig, args),
        tiers=tiers,
        keys=args.keys,
        audit_log=args.audit_log,
        limits=from_args(RequestLimits, args),
        proxies=proxies,
    )
    return 0


def cmd_keys(args) -> int:
    from softprompt.api.tenants import add_tenant, read_keys, revoke_tenant

    if args.keys_command == "add":
        key = add_tenant(args.file, args.tenant, args.tasks, upload=args.upload, delete=args.delete)
        print(
            f"added tenant '{args.tenant}' to {args.file}; its key (shown this once, stored only as "
            "its sha256) is:",
            file=sys.stderr,
        )
        print(key)
    elif args.keys_command == "revoke":
        revoke_tenant(args.file, args.tenant)
        print(
            f"revoked tenant '{args.tenant}'; a running server drops it within a second, or at SIGHUP",
            file=sys.stderr,
        )
    else:
        tenants = read_keys(args.file)
        if args.json:
            print_json(
                [{k: v for k, v in t.to_json().items() if k != "key_sha256"} for t in tenants]
            )
        for t in tenants if not args.json else ():
            rights = ",".join(a for a in ("upload", "delete") if getattr(t, a)) or "use"
            print(f"{t.name}\t{' '.join(t.tasks)}\t{rights}\t{t.created or ''}")
    return 0
