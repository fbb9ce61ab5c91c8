"""One data dictionary (deconflow/datadict.py): the tables as built have exactly its
columns, the DuckDB file carries it as COMMENT ON, Dagster's column schemas carry it, and
docs/data-dictionary.md is generated from it."""

from __future__ import annotations

from pathlib import Path

from deconflow import datadict
from deconflow.analysis.hypotheses import EXCLUDED_COLUMNS, RESULT_COLUMNS
from deconflow.protocol import FAMILIES
from deconflow.sweep import load_grid
from deconflow.warehouse import tables
from deconflow.warehouse.store import connect_readonly
from tests.sharing_pipeline import write_sweep

REPO = Path(__file__).resolve().parents[1]


def _cols(name: str) -> list[str]:
    return list(datadict.TABLES[name].columns)


def test_the_document_is_generated_from_the_dictionary():
    doc = (REPO / "docs" / "data-dictionary.md").read_text()
    assert doc == datadict.markdown(), (
        "regenerate: python3 -m deconflow.datadict > docs/data-dictionary.md"
    )


def test_every_table_as_built_has_exactly_the_dictionary_columns(tmp_path):
    runs = write_sweep(tmp_path / "data", 2)
    runs_df = tables.runs_table(load_grid(), {}, {})
    assert list(runs_df.columns) == _cols("runs")
    assert list(tables.completeness(runs_df).columns) == _cols("completeness")
    assert list(tables.run_settings(runs).columns) == _cols("run_settings")
    assert list(tables.run_fits(runs).columns) == _cols("run_fits")
    assert RESULT_COLUMNS == _cols("hypotheses")
    assert EXCLUDED_COLUMNS == _cols("hypotheses_excluded")
    for family, cols in FAMILIES.items():
        assert ["run_id", *cols] == _cols(family)
        assert datadict.TABLES[family].view


def test_the_duckdb_file_carries_the_dictionary_as_comments(tmp_path):
    data = tmp_path / "data"
    write_sweep(data, 2)
    con = connect_readonly(data / "deconflow.duckdb")
    try:
        rel = dict(con.execute("SELECT table_name, comment FROM duckdb_tables()").fetchall())
        rel |= dict(
            con.execute(
                "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal"
            ).fetchall()
        )
        cols = con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE NOT internal"
        ).fetchall()
    finally:
        con.close()
    for name, comment in rel.items():
        assert comment == datadict.TABLES[name].summary, name
    assert {"run_fits", "publication", *FAMILIES} <= set(rel)
    for table, column, comment in cols:
        assert comment == datadict.TABLES[table].columns[column], (table, column)


def test_dagster_column_schemas_carry_the_descriptions():
    from deconflow.assets.tables import table_metadata

    df = tables.runs_table(load_grid(), {}, {})
    schema = table_metadata(df, "runs")["dagster/column_schema"]
    got = {c.name: c.description for c in schema.columns}
    assert got == datadict.column_docs("runs")


def test_sql_help_and_the_export_use_it():
    from deconflow.cli import _sql_epilog

    epilog = _sql_epilog()
    assert all(f"  {name}" in epilog for name in datadict.TABLES)
    assert tables.FIT_COLUMNS == _cols("run_fits")
