"""Option helpers shared by several `vt` commands."""

from __future__ import annotations

import json

from typer.core import TyperCommand

from vtbench.errors import VTError
from vtbench.options import weights_choice  # noqa: F401  (re-exported for the commands)


def parse_model_kwargs(text: str | None) -> dict:
    """--model-kwargs takes a JSON object passed to timm.create_model, e.g. '{"img_size": 64}'."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise VTError(f"--model-kwargs must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise VTError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 64}'")
    return value


def split_list(values: list[str] | None) -> list[str] | None:
    """Accept repeated options and comma-separated values alike: --split train,test --split val."""
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


class MultiValueCommand(TyperCommand):
    """Lets ``--shots 1 5`` and ``--tokens 'cls[-1]' 'cls[-4:]'`` take several values after one flag (the options
    in ``multi_value``).

    Click options take one value each; this rewrites ``--shots 1 5`` into
    ``--shots 1 --shots 5`` before parsing (the command has no positional
    arguments, so a bare word can only belong to the option before it).
    """

    multi_value: tuple[str, ...] = ()  # the options that take several values

    def parse_args(self, ctx, args):
        rewritten, current, has_value = [], None, False
        for arg in args:
            if arg in self.multi_value:
                current, has_value = arg, False
            elif arg.startswith("-"):
                current = None
            elif current is not None and has_value:
                rewritten.append(current)
            else:
                has_value = True
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def command_from(app, name: str, options, body, *, takes_ctx: bool = False, multi_value: bool = True, **settings):
    """Register `vt NAME` on ``app`` with one typer option per :class:`~vtbench.options.Opt` of ``options``.

    ``body(**values)`` (plus ``ctx`` when ``takes_ctx``) runs the command; ``settings`` go to
    ``app.command`` (help, short_help, context_settings). Options that take several values accept
    ``--tokens a b`` as well as ``--tokens a --tokens b`` (:class:`MultiValueCommand`).
    """
    import inspect

    import typer

    params, annotations = [], {}
    if takes_ctx:
        params.append(inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
        annotations["ctx"] = typer.Context
    multi = []
    for opt in options:
        default = ... if opt.required else opt.default
        if opt.argument:
            info = typer.Argument(default, help=opt.help, metavar=opt.name.upper())
        else:
            info = typer.Option(default, *_declarations(opt), help=opt.help)
            if opt.multiple and multi_value:
                multi += [f for f in opt.flag_names() if "/" not in f]
        params.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=opt.annotation()))
        annotations[opt.name] = opt.annotation()

    def command(**values):
        return body(**values)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = annotations
    command.__name__ = name.replace("-", "_")
    command.__doc__ = body.__doc__
    cls = type(f"_{command.__name__.title()}Command", (MultiValueCommand,), {"multi_value": tuple(multi)})
    app.command(name, cls=cls, **settings)(command)
    return body


def _declarations(opt) -> list[str]:
    """typer's parameter declarations: '--norm/--no-norm' as one, else the long flag, aliases and short one."""
    if opt.flag and "/" in opt.flag:
        return [opt.flag] + ([opt.short] if opt.short else [])
    return opt.flag_names()
