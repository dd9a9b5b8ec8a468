// Command tandem-gpu-plugin advertises simulated NVIDIA GPUs on the dev cluster's real node through
// kubelet's real device-plugin API (v1beta1), the way NVIDIA's device plugin advertises real ones.
//
// It is a development stand-in: there is no GPU. kubelet counts the devices, admits and schedules
// pods against them and hands each container the IDs it was given (NVIDIA_VISIBLE_DEVICES, plus
// TANDEM_SIMULATED_GPU=true so a workload can tell); the container runs on the CPU.
//
// kubelet wipes its device-plugin folder when it (re)starts; the plugin notices its socket is gone
// and serves and registers again, so a restarted kubelet gets the GPUs back within a second.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	devices []*pluginapi.Device
	stop    chan struct{}
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

// ListAndWatch sends the devices once (they never change) and holds the stream until shutdown.
func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream pluginapi.DevicePlugin_ListAndWatchServer) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	select {
	case <-p.stop:
	case <-stream.Context().Done():
	}
	return nil
}

func (p *plugin) GetPreferredAllocation(
	context.Context, *pluginapi.PreferredAllocationRequest,
) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, container := range req.ContainerRequests {
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{
				"NVIDIA_VISIBLE_DEVICES": strings.Join(container.DevicesIDs, ","),
				"TANDEM_SIMULATED_GPU":   "true",
			},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

// serve listens on socket and registers resource with the kubelet listening on kubeletSocket.
func serve(p *plugin, socket, kubeletSocket, resource string) (*grpc.Server, error) {
	_ = os.Remove(socket)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	server := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(server, p)
	go func() { _ = server.Serve(listener) }()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+kubeletSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		server.Stop()
		return nil, err
	}
	defer conn.Close()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     filepath.Base(socket),
		ResourceName: resource,
		Options:      &pluginapi.DevicePluginOptions{},
	})
	if err != nil {
		server.Stop()
		return nil, fmt.Errorf("registering with kubelet at %s: %w", kubeletSocket, err)
	}
	return server, nil
}

func main() {
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name to advertise")
	count := flag.Int("count", 8, "number of simulated devices")
	dir := flag.String("socket-dir", pluginapi.DevicePluginPath, "kubelet's device-plugin folder")
	name := flag.String("socket-name", "tandem-gpu.sock", "file name of this plugin's socket in -socket-dir")
	flag.Parse()

	p := &plugin{stop: make(chan struct{})}
	for i := 0; i < *count; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("sim-gpu-%d", i), Health: pluginapi.Healthy})
	}
	socket := filepath.Join(*dir, *name)
	kubeletSocket := filepath.Join(*dir, filepath.Base(pluginapi.KubeletSocket))

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	var server *grpc.Server
	lastError := ""
	ticker := time.NewTicker(500 * time.Millisecond)
	defer ticker.Stop()
	for {
		if _, err := os.Stat(socket); server != nil && err != nil {
			log.Printf("socket %s is gone (kubelet restarted?): serving and registering again", socket)
			server.Stop()
			server = nil
		}
		if server == nil {
			var err error
			server, err = serve(p, socket, kubeletSocket, *resource)
			if err != nil {
				if err.Error() != lastError {
					log.Printf("waiting for kubelet: %v", err)
					lastError = err.Error()
				}
			} else {
				log.Printf("registered %d x %s with kubelet (%s)", *count, *resource, socket)
				lastError = ""
			}
		}
		select {
		case sig := <-signals:
			log.Printf("%v: stopping", sig)
			close(p.stop)
			if server != nil {
				server.Stop()
			}
			_ = os.Remove(socket)
			return
		case <-ticker.C:
		}
	}
}
