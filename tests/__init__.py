from tests.helpers.foreign_names import install

install()  # before any test module imports transformers: see tests/helpers/foreign_names.py
