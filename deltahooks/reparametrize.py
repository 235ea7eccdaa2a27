"""``torch.nn.utils.parametrize`` without its side effects on the base model's keys.

torch moves a parametrized ``weight`` to ``parametrizations.weight.original``: the
module's ``state_dict`` keys change, their order changes, and a base checkpoint no
longer loads with ``strict=True``. Here one parametrization is added or removed at a
time (others', the user's included, are left alone), and while deltahooks keeps any on a
module, one pair of state-dict hooks maps the keys back: the base model saves and loads
exactly the keys it had, in the order it had them. A parametrized *parameter* also stays
in the module's own ``_parameters`` under its name (the same object as torch's
``original``), so ``named_parameters()`` lists it as ``<path>.weight``, not
``<path>.parametrizations.weight.original``; attribute reads still go through the
parametrization, whose class property comes first. Removing the last one restores the
module's own parameter order too, so detach leaves ``_parameters`` as it found it.

torch refuses to pickle a parametrized module (its injected class has no importable
name). While deltahooks keeps a parametrization on a module, that class pickles the
module by the class it was made from, the names of its parametrized tensors and its
state; loading injects a class the way torch does and puts the state back, so
``pickle``/``torch.save(model)`` give a working copy (see :func:`_rebuild`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from torch import nn
from torch.nn.utils import parametrize

from .errors import UnsupportedOperationError

_BOOK = "_deltahooks_keys"


class KeyBook:
    """What a module looked like before deltahooks parametrized it, and the key-mapping hooks.

    It lives in the instance ``__dict__`` of the module's ``parametrizations`` container,
    which torch creates with the first parametrization and deletes with the last, so the
    base module itself gains no attribute.
    """

    def __init__(self, module: nn.Module) -> None:
        self.parameter_order = list(module._parameters)
        self.buffer_order = list(module._buffers)
        self.direct_keys = [
            name
            for name in (*module._parameters, *module._buffers)
            if name not in module._non_persistent_buffers_set
        ]
        self.attrs: set[str] = set()  # tensors whose keys deltahooks maps back
        self.functions: dict[str, list[nn.Module]] = {}  # deltahooks' parametrizations
        self.handles: list = []
        self.class_owner = 0  # id() of the module its Parametrized class was made for
        self.unsafe: dict[str, bool] = {}  # a chain's own flag, which torch ORs with ours
        self.borrowed_class: type | None = None  # the model's own Parametrized class

    def save_hook(self, module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
        """Rename ``parametrizations.<attr>.original`` back to ``<attr>``, in its old place."""
        renames = {
            f"{prefix}parametrizations.{attr}.original": f"{prefix}{attr}" for attr in self.attrs
        }
        if not any(key in state for key in renames):
            return
        subtree = {key: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        subtree = {renames.get(key, key): value for key, value in subtree.items()}
        for name in self.direct_keys:  # the module's own tensors first, in their old order
            key = prefix + name
            if key in subtree:
                state[key] = subtree.pop(key)
        state.update(subtree)  # then its children, as they came

    def load_hook(self, module: nn.Module, state: dict, prefix: str, *args) -> None:
        """Accept a base checkpoint's ``<attr>`` for the parametrized original (and, for an
        aliased parameter, torch's key for it too: both names then load the one tensor)."""
        for attr in self.attrs:
            key, original = prefix + attr, f"{prefix}parametrizations.{attr}.original"
            aliased = attr in module._parameters
            if key in state:
                state[original] = state[key] if aliased else state.pop(key)
            elif aliased and original in state:
                state[key] = state[original]


def _book(module: nn.Module) -> KeyBook | None:
    container = module._modules.get("parametrizations")
    return None if container is None else container.__dict__.get(_BOOK)


def _own_class(module: nn.Module, book: KeyBook | None) -> None:
    """Give ``module`` a Parametrized class of its own before torch edits that class.

    torch's ``deepcopy`` of a parametrized module shares its injected ``Parametrized<Class>``
    with the original, and registering or removing a parametrization adds or deletes a
    property *on the class*: detaching a delta from a copy would break the original.
    """
    if book is None or book.class_owner == id(module):
        return
    _copy_class(module)
    book.class_owner = id(module)  # a copy's book still holds the original's id


def _copy_class(module: nn.Module) -> type:
    """Give ``module`` a copy of its Parametrized class; returns the class it had."""
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return cls


def add(module: nn.Module, attr: str, function: nn.Module) -> None:
    """Parametrize ``module.<attr>`` by ``function`` (appended after any existing one)."""
    book = _book(module)
    _own_class(module, book)
    if book is None:
        book = KeyBook(module)
        if parametrize.is_parametrized(module):  # the model's own: torch's class, perhaps
            # shared with deep copies; deltahooks edits a copy and puts this one back
            book.borrowed_class = _copy_class(module)
    was_parametrized = parametrize.is_parametrized(module, attr)
    if was_parametrized and attr not in book.unsafe:  # the user's chain: keep its flag
        book.unsafe[attr] = module.parametrizations[attr].unsafe
    parametrize.register_parametrization(module, attr, function, unsafe=True)
    container = module._modules["parametrizations"]
    if _BOOK not in container.__dict__:
        book.class_owner = id(module)
        container.__dict__[_BOOK] = book
        book.handles = [
            # partials, not bound methods: torch marks the hook object with an attribute
            module.register_state_dict_post_hook(partial(KeyBook.save_hook, book)),
            module.register_load_state_dict_pre_hook(partial(KeyBook.load_hook, book)),
        ]
    book.functions.setdefault(attr, []).append(function)
    type(module).__reduce_ex__ = _reduce_parametrized
    if not was_parametrized:  # someone else's parametrization keeps torch's keys
        book.attrs.add(attr)
        original = container[attr].original
        if isinstance(original, nn.Parameter):  # listed under its own name, in its place
            module._parameters[attr] = original
            _reorder(module._parameters, book.parameter_order)


def remove(module: nn.Module, attr: str, function: nn.Module) -> None:
    """Remove exactly ``function`` from ``module.<attr>``'s parametrizations."""
    book = _book(module)
    _own_class(module, book)
    chain = module.parametrizations[attr]
    index = next(i for i, f in enumerate(chain) if f is function)
    if book is not None:
        owned = book.functions.get(attr, [])
        owned[:] = [f for f in owned if f is not function]
        if not owned:
            book.functions.pop(attr, None)
    if len(chain) > 1:
        del chain[index]
        if book is not None and attr not in book.functions and attr in book.unsafe:
            chain.unsafe = book.unsafe.pop(attr)
    else:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if book is not None:
            _reorder(module._parameters, book.parameter_order)
            _reorder(module._buffers, book.buffer_order)
    if book is None or attr in book.functions:
        return
    book.attrs.discard(attr)
    if parametrize.is_parametrized(module, attr):  # a user's parametrization stays: its keys
        module._parameters.pop(attr, None)
    if not book.functions:  # deltahooks keeps no parametrization here any more
        if parametrize.is_parametrized(module):  # the model's own stay: its class, as it was
            if book.borrowed_class is not None:
                module.__class__ = book.borrowed_class
            elif "__reduce_ex__" in vars(type(module)):
                delattr(type(module), "__reduce_ex__")
        for handle in book.handles:
            handle.remove()
        book.handles = []
        container = module._modules.get("parametrizations")
        if container is not None:
            container.__dict__.pop(_BOOK, None)


def _reorder(store: dict, order: list[str]) -> None:
    """Put ``store``'s keys back in ``order`` (keys it does not name keep their place after)."""
    items = dict(store)
    store.clear()
    for name in order:
        if name in items:
            store[name] = items.pop(name)
    store.update(items)


def foreign(module: nn.Module, attr: str) -> list[nn.Module]:
    """The functions of ``module.<attr>``'s parametrization that deltahooks did not add (a
    ``weight_norm``, a user's own), in chain order; empty when it is not parametrized.

    Example:
        >>> layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
        >>> [type(f).__name__ for f in foreign(layer, "weight")]
        ['_WeightNorm']
    """
    if not parametrize.is_parametrized(module, attr):
        return []
    book = _book(module)
    owned = [] if book is None else book.functions.get(attr, [])
    return [f for f in module.parametrizations[attr] if not any(f is o for o in owned)]


def base_value(module: nn.Module, attr: str):
    """``module.<attr>`` as the base model computes it: its own parametrizations applied
    (a ``weight_norm``'s ``g · v / ‖v‖``), deltahooks' left out.

    Example:
        >>> layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
        >>> bool((base_value(layer, "weight") == layer.weight).all())
        True
    """
    chain = module.parametrizations[attr]
    theirs = foreign(module, attr)
    if chain.is_tensor:
        value = chain.original
    else:  # several originals (weight_norm's g and v): the first function, not ours, takes them
        value = tuple(getattr(chain, f"original{i}") for i in range(chain.ntensors))
    for function in chain:
        if any(function is f for f in theirs):
            value = function(*value) if isinstance(value, tuple) else function(value)
    return value


def _reduce_parametrized(module: nn.Module, protocol: int):
    """Pickle a module deltahooks parametrized: the class it was made from, the names of
    its parametrized tensors, and its state as it is (torch's ``parametrizations``
    container with every function and original, deltahooks' key book and hooks)."""
    theirs = [type(f).__name__ for attr in module.parametrizations for f in foreign(module, attr)]
    if theirs:
        raise UnsupportedOperationError(
            f"cannot pickle {type(module).__bases__[0].__name__} with a delta's weight site: "
            f"the model's own parametrization of it ({', '.join(theirs)}) is one torch refuses "
            "to pickle, with or without a delta. Save the delta with delta.save(path) and the "
            "base with model.state_dict(), or detach the delta and remove that parametrization "
            "first"
        )
    base = type(module).__bases__[0]
    state = base.__getstate__(module)  # the injected class's own one refuses
    return _rebuild, (base, tuple(module.parametrizations)), state


def _rebuild(base: type, names: tuple[str, ...]) -> nn.Module:
    """An empty ``base`` module with a parametrized class like torch's: a subclass of
    ``base`` with one property per parametrized tensor (torch's own injection, so the
    properties behave exactly as ``register_parametrization`` makes them). Pickle then
    puts the state back with ``nn.Module.__setstate__``.
    """
    module = base.__new__(base)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    type(module).__reduce_ex__ = _reduce_parametrized
    return module


@contextmanager
def reads_without_side_effects(model: nn.Module) -> Iterator[None]:
    """Hold the model's own parametrization functions in eval mode for the duration, so
    that reading a weight while a delta is planned (its shape, its norm) does not advance
    them: ``spectral_norm`` steps its power iteration, updating its ``_u``/``_v`` buffers,
    whenever its weight is read in training mode. Their modes come back as they were.

    Example:
        >>> layer = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)).train()
        >>> u = layer.parametrizations.weight[0]._u.clone()
        >>> with reads_without_side_effects(layer):
        ...     _ = layer.weight
        >>> bool((layer.parametrizations.weight[0]._u == u).all()), layer.training
        (True, True)
    """
    modes = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            for function in foreign(module, attr):
                modes.extend((sub, sub.training) for sub in function.modules())
    try:
        for sub, _ in modes:
            sub.training = False
        yield
    finally:
        for sub, training in modes:
            sub.training = training
