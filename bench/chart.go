package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// chartCases are the cases charted, one panel each, when they were run.
var chartCases = [...]string{"select-simple", "select-extended", "select-prepared"}

// writeChart draws median TPS against clients, one line per target and one
// panel per -S case, as a PNG. The x axis is logarithmic when there are at
// least two client counts. It reports false when there is nothing to draw.
func writeChart(path string, rs *resultSet, targetNames []string) (wrote bool, err error) {
	defer func() { // gonum/plot panics on data it cannot draw
		if r := recover(); r != nil {
			wrote, err = false, fmt.Errorf("drawing the chart: %v", r)
		}
	}()
	var plots []*plot.Plot
	for _, c := range chartCases {
		if p := casePlot(c, rs, targetNames); p != nil {
			plots = append(plots, p)
		}
	}
	if len(plots) == 0 {
		return false, nil
	}
	const panelW, panelH = 420, 340
	img := vgimg.New(vg.Points(float64(panelW*len(plots))), vg.Points(panelH))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 1, Cols: len(plots), PadX: vg.Millimeter * 6, PadTop: vg.Millimeter * 2,
		PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}
	canvases := plot.Align([][]*plot.Plot{plots}, tiles, dc)
	for i, p := range plots {
		p.Draw(canvases[0][i])
	}
	f, err := os.Create(path)
	if err != nil {
		return false, err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return false, err
	}
	return true, f.Close()
}

// casePlot is one panel, or nil when the case has no results.
func casePlot(caseName string, rs *resultSet, targetNames []string) *plot.Plot {
	clientSet := map[int]bool{}
	for k := range rs.runs {
		if k.Case == caseName && rs.aggregate(k).ok {
			clientSet[k.Clients] = true
		}
	}
	if len(clientSet) == 0 {
		return nil
	}
	var clients []int
	for n := range clientSet {
		clients = append(clients, n)
	}
	slices.Sort(clients)

	p := plot.New()
	p.Title.Text = "pgbench " + caseName + ": median TPS"
	p.X.Label.Text = "clients"
	p.Y.Label.Text = "TPS"
	p.Y.Min = 0
	p.Y.Tick.Marker = plot.TickerFunc(func(min, max float64) []plot.Tick {
		ticks := plot.DefaultTicks{}.Ticks(min, max)
		for i := range ticks {
			if ticks[i].Label != "" {
				ticks[i].Label = strconv.FormatFloat(ticks[i].Value, 'f', 0, 64)
			}
		}
		return ticks
	})
	var ticks []plot.Tick
	for _, n := range clients {
		ticks = append(ticks, plot.Tick{Value: float64(n), Label: strconv.Itoa(n)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	logX := len(clients) > 1
	p.Legend.Top = true
	p.Legend.Left = true
	for i, t := range targetNames {
		var pts plotter.XYs
		for _, n := range clients {
			r := rs.aggregate(resultKey{caseName, n, t})
			if r.ok {
				pts = append(pts, plotter.XY{X: float64(n), Y: r.tps})
			}
		}
		if len(pts) == 0 {
			continue
		}
		line, points, err := plotter.NewLinePoints(pts)
		if err != nil {
			continue
		}
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		points.Color = plotutil.Color(i)
		points.Shape = plotutil.Shape(i)
		p.Add(line, points)
		p.Legend.Add(t, line, points)
	}
	if logX {
		p.X.Scale = plot.LogScale{}
		p.X.Min, p.X.Max = float64(clients[0])/1.5, float64(clients[len(clients)-1])*1.5
	} else { // a single client count: a linear axis around it
		p.X.Min, p.X.Max = 0, float64(clients[0])*2
	}
	p.Y.Max *= 1.15 // room for the legend
	return p
}
