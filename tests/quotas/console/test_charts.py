"""quotas/console/charts.py: the dashboard's chart geometry, from plain values."""

from quotas.console.charts import COLUMN, HEIGHT, axis_labels, line_chart, nice_peak, stacked_bars


def test_the_latest_bucket_is_always_labelled_and_aligned_inside_the_chart():
    labels = axis_labels([f"{h:02d}:00" for h in range(24)])
    # Every fourth hour from midnight, and the latest hour; 20:00 would touch 23:00.
    assert [label.text for label in labels] == ["00:00", "04:00", "08:00", "12:00", "16:00", "23:00"]
    # The last used to be centred on its bucket and clipped at the right edge: its right edge is the chart's now.
    assert (labels[-1].left_percent, labels[-1].align, labels[-1].minor) == (100.0, "end", False)
    assert (labels[0].left_percent, labels[0].align) == (0.0, "start")
    assert (labels[1].left_percent, labels[1].align) == (18.75, "middle")  # 04:00's centre
    assert [label.minor for label in labels] == [True, False] * 3  # every other one hides on a phone
    days = axis_labels([str(d) for d in range(30)])
    assert [label.text for label in days] == ["0", "5", "10", "15", "20", "29"]
    week = axis_labels(list("abcdefg"))
    assert [label.text for label in week] == list("aceg") and week[0].left_percent == 0
    assert [label.text for label in axis_labels(["only"])] == ["only"]


def test_nice_peaks():
    assert [nice_peak(v) for v in (0, 1, 7, 12, 0.3, 1050, 1875, 2600, 99_999)] == [
        0, 1, 8, 12, 0.3, 1200, 2000, 3000, 100_000]


def test_stacked_bars_scale_the_tallest_to_a_nice_top_and_skip_empty_values():
    chart = stacked_bars([(100, 300), (0, 0), (50, 0)], ("prompt", "completion"), ["a", "b", "c"], ["a", "b", "c"])
    assert (chart.width, chart.height, chart.peak) == (3 * COLUMN, HEIGHT, 400)
    prompt, completion, third = chart.rects
    assert (prompt.x, prompt.y, prompt.height, prompt.css_class) == (1, 75, 25, "prompt")
    assert (completion.y, completion.height, completion.css_class) == (0, 75, "completion")
    assert (third.x, third.y, third.height) == (21, 87.5, 12.5)
    assert [column.title for column in chart.columns] == ["a", "b", "c"]
    assert stacked_bars([(0, 0)], ("p", "c"), ["x"], ["x"]).peak == 0  # no usage: flat, no division by zero


def test_lines_break_where_a_bucket_has_no_value():
    chart = line_chart([("p50", "p50", [None, 1, 2, None, 3]), ("p95", "p95", [None] * 5)], list("abcde"),
                       list("abcde"))
    p50, p95 = chart.lines
    assert chart.peak == 3
    assert p50.d == "M15 66.67 L25 33.33 M45 0"
    assert p50.points == "M15 66.67h0.01 M25 33.33h0.01 M45 0h0.01"  # a dot at each point, the lone one too
    assert p95.d == p95.points == ""
