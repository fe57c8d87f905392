"""Command lines from a dataclass: each script lists its options once, each with a comment that becomes its --help.

    parser = cli.options_parser(Options, "what the script does")   # --some-field VALUE for every field
    opts = Options(**vars(parser.parse_args(argv)))

A bad command line is one line naming the option and the value (`error: --k abc: not an integer; see --help`, exit
code 2), not argparse's usage, which for these scripts is 26 lines that bury the message.
"""
import argparse
import dataclasses
import inspect
import re
import sys

import torch


def flag_of(name):
    """An option's flag: grad_accum -> --grad-accum."""
    return "--" + name.replace("_", "-")


def bad_value(opts, name, rule):
    """The one-line error for a bad option value: ValueError("--k 0: must be positive")."""
    return ValueError(f"{flag_of(name)} {getattr(opts, name)}: {rule}")


def no_effect(opts, table):
    """{option: why it has no effect} for `opts`: `table` maps (option, value) to the options that this value makes
    ineffective; why reads "with --method lora", or "without --prior-preservation" for a flag that is off."""
    ignored = {}
    for (name, value), names in table.items():
        if getattr(opts, name) == value:
            why = f"without {flag_of(name)}" if value is False else f"with {flag_of(name)} {value}"
            ignored.update(dict.fromkeys(names, why))
    return ignored


def check_values(opts, choices, positive, ignored=()):
    """Raise bad_value for the first option (in table order) whose value is not among its `choices` ({name:
    allowed values}), then for the first of `positive` (names; None counts as unset) that is not > 0. Options in
    `ignored` are not checked: they have no effect."""
    for name, allowed in choices.items():
        if name not in ignored and getattr(opts, name) not in allowed:
            raise bad_value(opts, name, f"must be one of {', '.join(allowed)}")
    for name in positive:
        value = getattr(opts, name)
        if name not in ignored and value is not None and value <= 0:
            raise bad_value(opts, name, "must be positive")


def check_subject_or_images(opts):
    """train_dreambooth.py learns a DreamBooth subject (--subject) or your own (--images, with --class-name): exactly
    one of them, each with what it needs; else a ValueError saying which to give."""
    if bool(opts.subject) == bool(opts.images):
        raise ValueError("give --subject (a subject of the DreamBooth dataset, e.g. dog6) or --images (a folder of "
                         "your photos)" + (", not both" if opts.subject else ""))
    if opts.images and not opts.class_name.strip():
        raise ValueError(f'--images needs --class-name: what the photos show (e.g. dog), for the prompt '
                         f'"a {opts.unique_token} <class-name>"')
    if opts.subject and opts.class_name:
        raise ValueError(f"--class-name goes with --images: --subject {opts.subject}'s class is the dataset's")


def check_device(opts, name="device"):
    """Raise bad_value unless the option is "auto" or a torch device this machine has (CUDA only where available)."""
    try:
        device = torch.device("cuda" if getattr(opts, name) == "auto" else getattr(opts, name))
    except RuntimeError:
        raise bad_value(opts, name, "not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if getattr(opts, name) != "auto" and device.type == "cuda" and not torch.cuda.is_available():
        raise bad_value(opts, name, "CUDA is not available here")


def warn_if_given(argv, ignored):
    """A one-line warning for each option in `ignored` ({name: why it has no effect}) that `argv` gives."""
    for name, why in sorted(ignored.items()):
        if any(arg == flag_of(name) or arg.startswith(flag_of(name) + "=") for arg in argv):
            print(f"warning: {flag_of(name)} has no effect {why}", file=sys.stderr)


def parse_bool(text):
    """A bool option's value: true/false, yes/no, on/off, 1/0."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


WHAT_A_VALUE_MUST_BE = {int: "not an integer", float: "not a number", bool: "not true or false"}


def value_of(type_, flag):
    """argparse's type= for one option: the text converted to `type_`, or an error that names the option and the
    value the way every other bad value is named (`--k abc: not an integer`)."""
    def convert(text):
        try:
            return parse_bool(text) if type_ is bool else type_(text)
        except (ValueError, argparse.ArgumentTypeError):
            what = WHAT_A_VALUE_MUST_BE.get(type_, f"not a {type_.__name__}")
            raise argparse.ArgumentTypeError(f"{flag} {text}: {what}") from None
    return convert


class OneLineErrors(argparse.ArgumentParser):
    """argparse, except that a bad command line gets one line (`error: --k abc: not an integer; see --help`, exit
    code 2) instead of the usage, which for these scripts is 26 lines that bury the message."""

    def error(self, message):
        # argparse words it "argument --output-dir/--out-dir: <what>"; value_of's <what> names the flag itself
        match = re.match(r"argument (-[^/:\s]+)\S*: (.*)", message, re.S)
        if match:
            flag, what = match.groups()
            message = what if what.startswith(flag + " ") else f"{flag}: {what}"
        self.exit(2, f"error: {message}; see --help\n")


def options_parser(options_class, description, aliases=None):
    """argparse from a dataclass: --some-field VALUE for every field, help = the comment after the field plus its
    [default]. A field without default is required; a bool takes "--flag", "--flag true" or "--flag false"; a list
    takes one or more values. `aliases` maps a field name to more flags (old names that must keep working).
    Errors are one line naming the option and the value (OneLineErrors); so are the scripts' own parser.error()s."""
    comments = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(options_class), re.M))
    parser = OneLineErrors(description=description, allow_abbrev=False)
    for field in dataclasses.fields(options_class):
        flags = [flag_of(field.name), *(aliases or {}).get(field.name, ())]
        help_text = comments.get(field.name, "").replace("%", "%%")  # argparse %-formats help texts
        if field.default not in (None, "", dataclasses.MISSING):  # None, "": a default that depends on others
            help_text += f" [{str(field.default).lower() if field.type is bool else field.default}]"
        kwargs = dict(dest=field.name, help=help_text)
        if field.default is dataclasses.MISSING:
            kwargs.update(type=value_of(field.type, flags[0]), required=True)
        elif field.type is bool:
            kwargs.update(type=value_of(bool, flags[0]), nargs="?", const=True, default=field.default,
                          metavar="true|false")
        elif field.type is list:
            kwargs.update(nargs="+", default=field.default)
        else:
            kwargs.update(type=value_of(field.type, flags[0]), default=field.default)
        parser.add_argument(*flags, **kwargs)
    return parser
