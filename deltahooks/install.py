"""Installing a part on a model, and the record of what was installed.

A :class:`~deltahooks.spec.Part` is what a method returns: its tensors and the sites
(:mod:`deltahooks.sites`) that use them. :func:`install_part` registers the tensors
through the :class:`~deltahooks.ledger.Ledger`, turns each site into the hook that runs
it (:mod:`deltahooks.call_hooks`, :mod:`deltahooks.attribute_hooks`), and returns an
:class:`InstalledPart`: what its Delta keeps, merges, unmerges and detaches by. The Part
is not kept; its tensors live on the model from then on.
"""

from __future__ import annotations

import dataclasses

import torch

from .attribute_hooks import ActiveFlag, CallMemo, RedirectHook, WeightFunction, apply_redirect
from .call_hooks import InputHook, OutputHook, RootCallHook
from .errors import SpecError, UnsupportedOperationError
from .ledger import Ledger, TensorEntry, join
from .merging import Merged, swap_in, swap_out
from .planning import Plan
from .runner import TensorSource
from .sites import FlagSite, InputSite, OutputSite, RedirectSite, RootCallSite, Site, WeightSite
from .spec import Part
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


def install_plan(
    ledger: Ledger, plan: Plan, switch: Switch
) -> tuple[list[InstalledPart], list[TensorEntry]]:
    """Install everything a plan holds: each spec's shared tensors on the root, then every
    part with its sites. Returns the installed parts and the shared tensors' entries."""
    shared_entries: list[TensorEntry] = []
    shared_by_spec = []
    for common in plan.shared:
        entries = {
            local: ledger.add_tensor(
                "", local, value.tensor, parameter=value.trainable, saved=value.saved
            )
            for local, value in common.items()
        }
        if entries:
            ledger.forgive_missing_delta_keys("")
        shared_entries.extend(entries.values())
        shared_by_spec.append(entries)
    parts = [
        install_part(ledger, part, index, switch, shared_by_spec[index])
        for index, part in plan.placed()
    ]
    return parts, shared_entries


def install_part(
    ledger: Ledger, part: Part, spec_index: int, switch: Switch, shared: dict[str, TensorEntry]
) -> InstalledPart:
    """Register the part's tensors once, then its sites (which merging takes away again).

    ``spec_index`` is which spec of its Delta made the part (the plan says), ``shared``
    the ledger entries of that spec's shared tensors, by local name.
    """
    record = InstalledPart(part, spec_index, shared)
    for (owner, local), (value, is_parameter) in part.tensors.items():
        saved = (owner, local) not in part.unsaved
        record.entries.append(
            ledger.add_tensor(owner, local, value, parameter=is_parameter, saved=saved)
        )
    for owner in dict.fromkeys(owner for owner, _ in part.tensors):
        ledger.forgive_missing_delta_keys(owner)
    record.install_sites(ledger, switch)
    return record


class InstalledPart:
    """What one :class:`~deltahooks.spec.Part` left on the model, kept by its Delta.

    The declaration's facts that merging, routing and summaries read (``path``,
    ``target``, ``note``, ``sites``, how it merges), and the ledger entries of what was
    added: the part's tensors (``entries``), its sites while unmerged (``installed``),
    and what merging swapped in (``merges``).
    """

    def __init__(self, part: Part, spec_index: int, shared: dict[str, TensorEntry]) -> None:
        self.path, self.target, self.note = part.path, part.target, part.note
        self.spec_index = spec_index  # which spec of its Delta made it
        self.sites = part.sites
        self.merge_fn, self.cannot_merge = part.merge_fn, part.cannot_merge
        self.merge_order, self.exclusive_merge = part.merge_order, part.exclusive_merge
        self.shared = shared  # the spec's shared tensors, by local name
        self.entries: list[TensorEntry] = []  # the ledger entries holding the part's tensors
        self.installed: list = []  # ledger entries of the sites now installed
        self.merges: list[Merged] = []  # what merge() swapped in, for unmerge()

    # --------------------------------------------------------------- sites
    def _source(self, ledger: Ledger, names: tuple[str, ...], path: str = "") -> TensorSource:
        path = path or self.path  # the module the site sits on
        own = {entry.local: entry for entry in self.entries if entry.path == path}
        found = []
        for name in names:
            entry = own.get(name) or self.shared.get(name)
            if entry is None:
                raise SpecError(
                    f"a site on {self.path!r} names tensor {name!r}, which the part does not "
                    f"define (it has {sorted(own)}, shared {sorted(self.shared)})"
                )
            found.append((entry.path != path, entry.is_parameter, entry.reserved))
        return TensorSource(tuple(found), ledger.root if any(s for s, _, _ in found) else None)

    def install_sites(self, ledger: Ledger, switch: Switch) -> None:
        for site in self.sites:
            path = self.path
            if isinstance(site, RedirectSite):
                source = {(entry.path, entry.local): entry for entry in self.entries}
            else:
                if isinstance(site, WeightSite) and "." in site.attr:
                    # a tensor of a submodule ("out_proj.weight"): the site sits on that
                    # submodule and names the part's tensors registered there
                    child, _, attr = site.attr.rpartition(".")
                    path, site = join(self.path, child), dataclasses.replace(site, attr=attr)
                source = self._source(ledger, site.tensors, path)
            self.installed.extend(install_site(ledger, path, site, switch, source))

    def remove_sites(self, ledger: Ledger) -> None:
        """Take the sites away: a merged delta computes through the weights alone."""
        while self.installed:
            ledger.remove(self.installed.pop())

    def sync(self, ledger: Ledger, switch: Switch) -> None:
        """Bring what the sites set outside a forward (redirects) in line with the switch."""
        for site in self.sites:
            if isinstance(site, RedirectSite):
                sync_redirect(ledger, site, self.entries, switch.active)

    # --------------------------------------------------------------- tensors
    def live(self, ledger: Ledger) -> dict[str, torch.Tensor]:
        """The live tensors by name relative to the target (shared ones by their name)."""
        tensors = {name: ledger.tensor(entry) for name, entry in self.shared.items()}
        for entry in self.entries:
            relative = entry.path[len(self.path) :].lstrip(".") if self.path else entry.path
            tensors[join(relative, entry.local)] = ledger.tensor(entry)
        return tensors

    # ----------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, ledger: Ledger, method: str) -> None:
        if self.merge_fn is None:
            raise UnsupportedOperationError(
                f"{method} on {self.path or '<root>'!r} cannot be merged into the weights: "
                f"{self.cannot_merge or 'it is not a change of weights'}; keep the delta unmerged"
            )
        values = self.merge_fn(ledger.module(self.path), self.live(ledger))
        for relative, value in values.items():
            owner, _, attr = join(self.path, relative).rpartition(".")
            self.merges.append(swap_in(ledger, owner, attr, value))

    def unmerge(self, ledger: Ledger) -> None:
        """Restore every tensor :meth:`merge` swapped, newest first."""
        while self.merges:
            swap_out(ledger, self.merges.pop())
