"""Installing a part on a model: its sites through the ledger, as the hooks that run them.

:mod:`deltahooks.sites` says what a method declares; this module turns each declaration
into its hook (:mod:`deltahooks.call_hooks`, :mod:`deltahooks.attribute_hooks`) and
registers it through the :class:`~deltahooks.ledger.Ledger`, which keeps what undoes it.
"""

from __future__ import annotations

from .attribute_hooks import ActiveFlag, CallMemo, RedirectHook, WeightFunction, apply_redirect
from .call_hooks import InputHook, OutputHook, RootCallHook
from .ledger import Ledger
from .sites import FlagSite, InputSite, OutputSite, RedirectSite, RootCallSite, Site, WeightSite
from .switch import Switch


def _redirect_pairs(site: RedirectSite, entries: dict) -> dict[str, list[tuple[str, str, bool]]]:
    owners: dict[str, list[tuple[str, str, bool]]] = {}
    for owner, local in site.keys:
        entry = entries[(owner, local)]
        owners.setdefault(owner, []).append((local, entry.reserved, entry.is_parameter))
    return owners


def sync_redirect(ledger: Ledger, site: RedirectSite, entries: list, active: bool) -> None:
    """Set or clear the redirects now, for code that reads attributes outside a forward."""
    by_key = {(entry.path, entry.local): entry for entry in entries}
    for owner, pairs in _redirect_pairs(site, by_key).items():
        apply_redirect(ledger.module(owner), active, pairs)


def install_site(ledger: Ledger, path: str, site: Site, switch: Switch, source) -> list:
    """Register one site through the ledger; returns the ledger entries that undo it.

    ``source`` is the :class:`TensorSource` of the site's tensors, or for a
    :class:`RedirectSite` the part's tensor entries by ``(owner, local)``.
    """
    if isinstance(site, OutputSite):
        hook = OutputHook(site, switch, source)
        entry = ledger.forward_hook(path, hook, with_kwargs=True, prepend=site.prepend)
        hook.hook_id = entry.handle.id
        return [entry]
    if isinstance(site, InputSite):
        hook = InputHook(site, switch, source)
        return [ledger.forward_pre_hook(path, hook, with_kwargs=True)]
    if isinstance(site, RootCallSite):
        hook = RootCallHook(site, switch, source, ledger.module(path))
        return [ledger.forward_pre_hook(site.module, hook, with_kwargs=True)]
    if isinstance(site, WeightSite):
        memo = CallMemo() if site.once_per_call else None
        function = WeightFunction(site, switch, source, ledger.module(path), memo)
        installed = [ledger.parametrize(path, site.attr, function)]
        if memo is not None:
            installed.append(ledger.forward_pre_hook(path, memo.open))
            installed.append(ledger.forward_hook(path, memo.close, always_call=True))
        return installed
    if isinstance(site, FlagSite):
        flag = ActiveFlag(switch)
        return [ledger.attribute(module, site.attr, flag) for module in site.modules]
    if isinstance(site, RedirectSite):
        installed = []
        for owner, pairs in _redirect_pairs(site, source).items():
            for attr, reserved, is_parameter in pairs:
                store = (
                    ledger.module(owner)._parameters
                    if is_parameter
                    else ledger.module(owner)._buffers
                )
                installed.append(ledger.shadow(owner, attr, store[reserved]))
            installed.append(ledger.forward_pre_hook(owner, RedirectHook(switch, pairs)))
        return installed
    raise TypeError(f"unknown site {site!r}; use one of the site classes in deltahooks.sites")
