// Package hyperboxsuite runs containerd's own snapshotter test suite against a
// running hyperbox-snapshotter, through containerd's proxy snapshotter
// client: the same gRPC calls containerd makes for a `[proxy_plugins]` entry.
//
// The suite expects a fresh snapshotter per case (it passes a new root
// directory each time). hyperbox is one daemon with one root, so the cases
// run one at a time and each starts and ends with the daemon holding no
// snapshot; the daemon itself outlives every case.
//
// Run it with the daemon's socket in HYPERBOX_SNAPSHOTTER_SOCKET, as root
// (the suite mounts what the snapshotter returns):
//
//	go test -c -o suite.test . && HYPERBOX_SNAPSHOTTER_SOCKET=/run/hyperbox/snapshotter.sock ./suite.test -test.v
//
// integration/tests/containerd_testsuite.rs builds, runs and checks it.
package hyperboxsuite

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// socketEnv names the variable holding the daemon's gRPC socket path.
const socketEnv = "HYPERBOX_SNAPSHOTTER_SOCKET"

// snapshotterName is what the proxy client puts in every request, and what
// the suite uses to pick snapshotter-specific expectations (none for us).
const snapshotterName = "hyperbox"

// exclusive is held from a case's factory call to its cleanup. The suite
// marks every case parallel, but cases share key names ("c1", "p", ...)
// and Walk expects to see only its own snapshots, which holds on one
// daemon only if cases never overlap, whatever -test.parallel says.
var exclusive sync.Mutex

func TestHyperboxSnapshotter(t *testing.T) {
	socket := os.Getenv(socketEnv)
	if socket == "" {
		t.Skipf("%s is not set: start hyperbox-snapshotter and point it at its socket", socketEnv)
	}
	if os.Geteuid() != 0 {
		t.Skip("the suite mounts snapshots: needs root")
	}
	testsuite.SnapshotterSuite(t, snapshotterName, func(ctx context.Context, _ string) (snapshots.Snapshotter, func() error, error) {
		return connect(ctx, socket)
	})
}

// connect returns a proxy snapshotter on the daemon at socket, emptied of
// anything an earlier case left, and the cleanup that empties it again and
// closes the connection (but never stops the daemon).
func connect(ctx context.Context, socket string) (snapshots.Snapshotter, func() error, error) {
	exclusive.Lock()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		exclusive.Unlock()
		return nil, nil, fmt.Errorf("connect to %s: %w", socket, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)
	if err := removeEverything(ctx, sn); err != nil {
		conn.Close()
		exclusive.Unlock()
		return nil, nil, fmt.Errorf("empty the daemon before the case: %w", err)
	}
	cleanup := func() error {
		defer exclusive.Unlock()
		defer conn.Close()
		return removeEverything(ctx, sn)
	}
	return sn, cleanup, nil
}

// removeEverything removes every snapshot, children before parents, then
// asks the daemon to clean up, as containerd's garbage collector would after
// deleting them. It fails if a snapshot survives or a removal is refused.
func removeEverything(ctx context.Context, sn snapshots.Snapshotter) error {
	for {
		var all []snapshots.Info
		if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			all = append(all, info)
			return nil
		}); err != nil {
			return fmt.Errorf("walk: %w", err)
		}
		if len(all) == 0 {
			break
		}
		parents := map[string]bool{}
		for _, info := range all {
			if info.Parent != "" {
				parents[info.Parent] = true
			}
		}
		removed := 0
		for _, info := range all {
			if parents[info.Name] {
				continue
			}
			if err := sn.Remove(ctx, info.Name); err != nil {
				return fmt.Errorf("remove %q: %w", info.Name, err)
			}
			removed++
		}
		// Every forest has a leaf; none removed means Walk reported a
		// parent cycle or a parent it does not list.
		if removed == 0 {
			return fmt.Errorf("%d snapshots left, none of them a leaf", len(all))
		}
	}
	if cleaner, ok := sn.(snapshots.Cleaner); ok {
		if err := cleaner.Cleanup(ctx); err != nil {
			return fmt.Errorf("cleanup: %w", err)
		}
	}
	return nil
}
